"""How the report writes a number with its uncertainty, and the verdict words it attaches.

One formatter for a :class:`probe.uncertainty.Comparison` dict (``effect``, ``low``, ``high``, ``p``,
``p_adjusted``, ``n``) and one for an :class:`probe.uncertainty.Estimate` dict (``value``, ``low``,
``high``, ``n``), used by every section, the template (as Jinja filters) and ``report.json``'s claims:

- comparison: ``−0.53 [−0.58, −0.47], p < 0.001 (Holm), n = 16``
- estimate: ``0.82 [0.71, 0.90], n = 22``

The interval's decimals follow its half-width (two significant digits of it), so a number is never
printed more precisely than it is known. A verdict is stated only when the comparison is
distinguishable (:meth:`probe.uncertainty.Comparison.distinguishable`: its Holm-adjusted p, else its p, below
:data:`probe.uncertainty.ALPHA`, and its interval clear of 0); otherwise the
words are "not distinguishable from ...".
"""

from __future__ import annotations

import math
from typing import Any, Optional

from probe.uncertainty import ALPHA, Comparison

MINUS = "\u2212"


def is_comparison(d: Any) -> bool:
    return isinstance(d, dict) and "effect" in d and "p" in d


def is_estimate(d: Any) -> bool:
    return isinstance(d, dict) and "value" in d and "low" in d and "high" in d and "effect" not in d


def main_number(d: Any) -> Optional[float]:
    """The number a Comparison (its effect) or Estimate (its value) stands for; a plain number itself."""
    if is_comparison(d):
        d = d["effect"]
    elif is_estimate(d):
        d = d["value"]
    if isinstance(d, bool) or not isinstance(d, (int, float)):
        return None
    return float(d) if math.isfinite(d) else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _decimals(low, high) -> Optional[int]:
    if not (_finite(low) and _finite(high)) or high - low <= 0:
        return None
    half = (high - low) / 2
    return int(min(6, max(0, 1 - math.floor(math.log10(half)))))


def num(v, decimals: Optional[int] = None) -> str:
    """A number with a true minus sign; three significant digits unless ``decimals`` is given."""
    if not _finite(v):
        return "undefined"
    if decimals is not None:
        s = f"{v:.{decimals}f}"
    elif abs(v) >= 1000:
        s = f"{v:,.0f}"
    else:
        s = f"{v:.3g}"
    if s.lstrip("-").strip("0.") == "":  # -0.00 -> 0.00
        s = s.lstrip("-")
    return s.replace("-", MINUS)


def fmt_p(p) -> str:
    if not _finite(p):
        return "p undefined"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"


def _interval(centre, low, high) -> str:
    dec = _decimals(low, high)
    if dec is None:
        return num(centre) + (" [interval undefined]" if not (_finite(low) and _finite(high)) else " [no spread]")
    return f"{num(centre, dec)} [{num(low, dec)}, {num(high, dec)}]"


def fmt_comparison(d: Optional[dict]) -> str:
    """``effect [low, high], p (Holm where adjusted), n`` of a Comparison dict."""
    if not is_comparison(d):
        return "not tested"
    adjusted = d.get("p_adjusted")
    p = fmt_p(adjusted if adjusted is not None else d.get("p"))
    if adjusted is not None:
        p += " (Holm)"
    n = f", n = {d['n']}" if d.get("n") is not None else ""
    return f"{_interval(d.get('effect'), d.get('low'), d.get('high'))}, {p}{n}"


def fmt_estimate(d: Optional[dict]) -> str:
    """``value [low, high], n`` of an Estimate dict."""
    if not is_estimate(d):
        return "not estimated"
    n = f", n = {d['n']}" if d.get("n") is not None else ""
    return f"{_interval(d.get('value'), d.get('low'), d.get('high'))}{n}"


def distinguishable(d: Optional[dict], alpha: float = ALPHA) -> bool:
    """:meth:`probe.uncertainty.Comparison.distinguishable` of a comparison dict (the one rule)."""
    return is_comparison(d) and Comparison.from_dict(d).distinguishable(alpha)


def verdict(d: Optional[dict], better: str, worse: str, neither: str, sign: int = 1) -> str:
    """``better`` when the effect is distinguishable and ``sign * effect > 0``, ``worse`` when distinguishable
    the other way, else ``neither``; "not tested" without a comparison."""
    if not is_comparison(d):
        return "not tested"
    if not distinguishable(d) or not _finite(d.get("effect")) or d["effect"] == 0:
        return neither
    return better if sign * d["effect"] > 0 else worse


def claim(section: str, run: str, subject: str, statement: str, stat: Optional[dict], **extra) -> dict:
    """One sentence the report states, with the Comparison or Estimate behind it (for report.json)."""
    kind = "comparison" if is_comparison(stat) else "estimate" if is_estimate(stat) else None
    if kind == "comparison":
        text = fmt_comparison(stat)
    elif kind == "estimate":
        text = fmt_estimate(stat)
    elif extra.get("tests"):
        text = "; ".join(f"{k}: {fmt_comparison(v)}" for k, v in extra["tests"].items())
    else:
        text = "not tested"
    return {"section": section, "run": run, "subject": subject, "statement": statement, "kind": kind,
            "stat": stat, "text": text, **extra}


FILTERS = {"comparison": fmt_comparison, "estimate": fmt_estimate}


def estimates(d: Any, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every Estimate dict inside a nested metrics dict, with its key path."""
    if is_estimate(d):
        return [(path, d)]
    if is_comparison(d):
        return []
    if isinstance(d, dict):
        return [x for k, v in d.items() for x in estimates(v, path + (str(k),))]
    return []


def comparisons(d: Any, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every Comparison dict inside a nested metrics dict, with its key path."""
    if is_comparison(d):
        return [(path, d)]
    if isinstance(d, dict):
        return [x for k, v in d.items() for x in comparisons(v, path + (str(k),))]
    return []


def counts(d: dict) -> Optional[tuple[int, int]]:
    """(k, n) of a proportion Estimate: its own k if written, else value * n rounded."""
    if not is_estimate(d) or not d.get("n"):
        return None
    n = int(d["n"])
    k = d.get("k")
    k = int(round(d["value"] * n)) if k is None else int(k)
    return k, n
