"""Rank attribution methods only where faithfulness metrics agree (issue 13, item 10).

Faithfulness metrics disagree with each other (Hedström et al., "LATEC", NeurIPS 2024), so one metric's
order is not a ranking. For each pair of methods (a, b) of one run and each metric, the paired difference
over the probe images (true-class rows) is tested with :func:`probe.uncertainty.paired_comparison`, Holm-
adjusted over the pairs of that metric (:func:`probe.uncertainty.adjust`). An order "a more faithful than
b" is stated only when *every* metric orders the pair the same way and each of those differences is
distinguishable: an intersection-union test (Berger 1982, "Multiparameter hypothesis testing and
acceptance sampling"), level alpha without a further adjustment across metrics. Where two metrics order
a pair in opposite directions, both distinguishably, the report says that they disagree.

Metrics (per image, "better" direction):

- deletion: deletion AUC (lower is better: the probability falls faster when the map's pixels go first);
- insertion: insertion AUC (higher is better);
- ROAD: LeRF AUC minus MoRF AUC (Rong et al. 2022; higher is better: removing the most relevant pixels
  first hurts more than removing the least relevant first).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from probe.uncertainty import Comparison, adjust, paired_comparison


@dataclass(frozen=True)
class Metric:
    name: str
    columns: tuple[str, ...]  # one column, or (plus, minus): the per-image value is plus - minus
    sign: int  # +1: higher is better; -1: lower is better

    def values(self, rows: pd.DataFrame) -> pd.Series | None:
        if not all(c in rows.columns for c in self.columns):
            return None
        v = rows[self.columns[0]].astype(float)
        if len(self.columns) == 2:
            v = v - rows[self.columns[1]].astype(float)
        return v


METRICS = (Metric("deletion", ("deletion_auc",), -1), Metric("insertion", ("insertion_auc",), +1),
           Metric("ROAD LeRF\u2212MoRF", ("road_lerf_auc", "road_morf_auc"), +1))


@dataclass
class PairResult:
    a: str
    b: str
    tests: dict[str, Comparison]  # metric -> comparison of a - b
    directions: dict[str, int]  # metric -> +1 (a better), -1 (b better), 0 (not distinguishable)

    @property
    def verdict(self) -> str:
        d = set(self.directions.values())
        if d == {1}:
            return f"{self.a} more faithful than {self.b}: every metric agrees"
        if d == {-1}:
            return f"{self.b} more faithful than {self.a}: every metric agrees"
        if {1, -1} <= d:
            fa = [m for m, v in self.directions.items() if v == 1]
            fb = [m for m, v in self.directions.items() if v == -1]
            return f"metrics disagree: {', '.join(fa)} favour{'s' if len(fa) == 1 else ''} {self.a}; " \
                   f"{', '.join(fb)} favour{'s' if len(fb) == 1 else ''} {self.b}"
        return "no order: not distinguishable by " + ", ".join(m for m, v in self.directions.items() if v == 0)

    @property
    def agreed(self) -> int:
        d = set(self.directions.values())
        return 1 if d == {1} else -1 if d == {-1} else 0


def per_image(metrics: pd.DataFrame) -> dict[str, dict[str, pd.Series]]:
    """metric -> method -> per-image values (true-class rows, indexed by probe image); metrics whose
    columns the table lacks are left out."""
    rows = metrics[metrics["target_kind"] == "true"] if "target_kind" in metrics.columns else metrics
    key = "image" if "image" in rows.columns else "item"
    out: dict[str, dict[str, pd.Series]] = {}
    for m in METRICS:
        per_method = {}
        for method, g in rows.groupby("method", sort=False):
            v = m.values(g)
            if v is not None:
                v = pd.Series(v.to_numpy(), index=g[key].to_numpy())
                v = v[np.isfinite(v.to_numpy())]
                if len(v):
                    per_method[str(method)] = v
        if per_method:
            out[m.name] = per_method
    return out


def rank_pairs(values: dict[str, dict[str, pd.Series]], seed: int = 0) -> list[PairResult]:
    """Every pair of methods, tested on every metric (Holm over the pairs within a metric)."""
    signs = {m.name: m.sign for m in METRICS}
    methods = sorted(set.intersection(*(set(v) for v in values.values()))) if values else []
    # a method some metric lacks cannot be ordered by every metric: it is left out
    pairs = list(itertools.combinations(methods, 2))
    tests: dict[tuple[str, str], dict[str, Comparison]] = {p: {} for p in pairs}
    for metric, per_method in values.items():
        family = []
        for a, b in pairs:
            common = per_method[a].index.intersection(per_method[b].index)
            if len(common) < 2:
                continue
            x, y = per_method[a].loc[common].to_numpy(), per_method[b].loc[common].to_numpy()
            family.append(((a, b), paired_comparison(x, y, seed=seed)))
        for (pair, _), c in zip(family, adjust([c for _, c in family])):
            tests[pair][metric] = c
    results = []
    for a, b in pairs:
        t = tests[(a, b)]
        if not t:
            continue
        # a metric that could not test the pair (no common images) counts as not distinguishing it
        directions = {m: (0 if m not in t or not t[m].distinguishable() or t[m].effect == 0 else
                          (1 if signs[m] * t[m].effect > 0 else -1)) for m in values}
        results.append(PairResult(a, b, t, directions))
    return results


def total_order(methods: list[str], pairs: list[PairResult]) -> list[str] | None:
    """The methods from most to least faithful when every pair is agreed, else None."""
    wins = {m: 0 for m in methods}
    for p in pairs:
        if p.agreed == 0:
            return None
        wins[p.a if p.agreed == 1 else p.b] += 1
    order = sorted(methods, key=lambda m: -wins[m])
    n = len(methods)
    return order if sorted(wins.values()) == list(range(n)) else None
