"""Units across two networks: correlation of every unit pair, and the matches it implies.

After Li, Yosinski, Clune, Lipson & Hopcroft 2016, "Convergent learning: do different neural networks learn
the same representations?" (ICLR), sections 2-3:

- :class:`UnitCorrelation`: the Pearson correlation of every unit (channel) ``i`` of layer A with every unit
  ``j`` of layer B over all images and all spatial positions, i.e. of the columns of the two layers' outputs
  flattened to ``(N * H * W, C)`` (Li et al. correlate activations over images and positions, section 2).
  The two maps must have the same ``H x W`` (position ``(y, x)`` of one is compared with ``(y, x)`` of the
  other; a :class:`~probe.errors.ConfigError` names both layers and shapes otherwise); a linear layer
  ``(N, F)`` is ``F`` units at one position. Streaming and mergeable: float64 sums of the values about a
  per-unit shift (the first batch's mean, so a unit with a large mean and a small spread keeps its digits),
  of their squares and of the cross products ``(C_a, C_b)``; memory is fixed by the two widths.
- :meth:`UnitCorrelation.best_match`: Li et al.'s *semi-matching*: each unit's partner is the unit of the
  other network it correlates with most (signed correlation, as theirs; several units may share a partner).
- :meth:`UnitCorrelation.one_to_one`: Li et al.'s *bipartite* matching: the one-to-one assignment that
  maximises the total correlation (Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`), and
  :meth:`UnitCorrelation.permutation`, the order of B's units that aligns them to A's.
- :meth:`UnitCorrelation.summary`: the fraction of A's units whose match correlates above 0.5 and above 0.8
  (over *all* of A's units: unmatched ones count as not above), for both matchings.

Constant units (variance <= ``CONSTANT_TOL`` times their mean square: a dead ReLU, a constant channel) have
NaN correlations and are never matched: they are left out of the assignment and reported without a partner.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe.errors import ConfigError
from probe.files import write_npz

CONSTANT_TOL = 1e-20  # variance <= this * mean square (std below 1e-10 of the rms, far below float32 resolution)
THRESHOLDS = (0.5, 0.8)


def _spatial(name: str, x: torch.Tensor) -> tuple[int, int]:
    if x.dim() == 2:
        return (1, 1)
    if x.dim() == 4:
        return tuple(x.shape[2:])
    raise ConfigError(f"unit matching: '{name}' outputs shape {tuple(x.shape)}; units are read from (N, C, H, W) "
                      "or (N, F) outputs")


def _units(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` or ``(N, F)`` -> ``(N * H * W, C)`` float64: one row per image and position."""
    if x.dim() == 2:
        return x.double()
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


class UnitCorrelation:
    """Streaming Pearson correlation of every unit of layer ``name_a`` with every unit of layer ``name_b``.

    ``update(a, b)`` takes the two layers' outputs on the same images: ``(N, C_a, H, W)`` and
    ``(N, C_b, H, W)`` (or ``(N, F)``). State lives on the device of the first batch.
    """

    FIELDS = ("shift_a", "shift_b", "sum_a", "sum_b", "sq_a", "sq_b", "cross")

    def __init__(self, name_a: str = "a", name_b: str = "b"):
        self.name_a, self.name_b = name_a, name_b
        self.units: tuple[int, int] | None = None
        self.shape: tuple[int, int] | None = None  # (H, W)
        self.count = 0  # rows: images x positions
        self.images = 0

    def _check(self, a: torch.Tensor, b: torch.Tensor) -> None:
        sa, sb = _spatial(self.name_a, a), _spatial(self.name_b, b)
        if sa != sb:
            raise ConfigError(f"unit matching: '{self.name_a}' has {sa[0]}x{sa[1]} maps {tuple(a.shape)} and "
                              f"'{self.name_b}' {sb[0]}x{sb[1]} maps {tuple(b.shape)}; correlating units needs the "
                              "same H x W: pick layers of the same resolution")
        if a.shape[0] != b.shape[0]:
            raise ConfigError(f"unit matching: '{self.name_a}' has {a.shape[0]} images and '{self.name_b}' "
                              f"{b.shape[0]}; both must be outputs on the same images")
        if self.units is not None and ((a.shape[1], b.shape[1]) != self.units or sa != self.shape):
            raise ValueError(f"unit matching: batch of shapes {tuple(a.shape)}, {tuple(b.shape)} after "
                             f"{self.units} units on {self.shape} maps")

    def _init(self, ca: int, cb: int, shape: tuple[int, int], device: torch.device) -> None:
        self.units, self.shape, self.device = (ca, cb), shape, torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.shift_a, self.sum_a, self.sq_a = (torch.zeros(ca, **f64) for _ in range(3))
        self.shift_b, self.sum_b, self.sq_b = (torch.zeros(cb, **f64) for _ in range(3))
        self.cross = torch.zeros(ca, cb, **f64)

    @torch.no_grad()
    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add one batch: the outputs of layer A and layer B on the same ``N`` images."""
        self._check(a, b)
        A, B = _units(a.detach()), _units(b.detach().to(a.device))
        if self.units is None:
            self._init(a.shape[1], b.shape[1], _spatial(self.name_a, a), a.device)
            self.shift_a, self.shift_b = A.mean(0), B.mean(0)
        A = A - self.shift_a
        B = B - self.shift_b
        self.sum_a += A.sum(0)
        self.sum_b += B.sum(0)
        self.sq_a += A.square().sum(0)
        self.sq_b += B.square().sum(0)
        self.cross += A.T @ B
        self.count += A.shape[0]
        self.images += a.shape[0]

    def merge(self, other: "UnitCorrelation") -> "UnitCorrelation":
        """Add ``other`` (other images of the same two layers) into this one; returns self."""
        if other.units is None:
            return self
        if self.units is None:
            self._init(*other.units, other.shape, other.device)
            self.shift_a, self.shift_b = other.shift_a.to(self.device).clone(), other.shift_b.to(self.device).clone()
        if (self.units, self.shape) != (other.units, other.shape):
            raise ValueError(f"unit matching: cannot merge {other.units} units on {other.shape} maps into "
                             f"{self.units} on {self.shape}")
        # move other's sums to this shift: x - s = (x - s') + (s' - s)
        da = other.shift_a.to(self.device) - self.shift_a
        db = other.shift_b.to(self.device) - self.shift_b
        n = other.count
        oa, ob = other.sum_a.to(self.device), other.sum_b.to(self.device)
        self.cross += other.cross.to(self.device) + oa[:, None] * db[None, :] + da[:, None] * ob[None, :] + n * da[:, None] * db[None, :]
        self.sq_a += other.sq_a.to(self.device) + 2 * da * oa + n * da * da
        self.sq_b += other.sq_b.to(self.device) + 2 * db * ob + n * db * db
        self.sum_a += oa + n * da
        self.sum_b += ob + n * db
        self.count += other.count
        self.images += other.images
        return self

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out = {"meta": np.array([self.count, self.images, *(self.shape or (0, 0))], dtype=np.int64),
               "names": np.array([self.name_a, self.name_b], dtype=np.str_)}
        if self.units is not None:
            out.update({f: getattr(self, f).cpu().numpy() for f in self.FIELDS})
        return out

    @classmethod
    def from_state(cls, state, device="cpu") -> "UnitCorrelation":
        count, images, H, W = (int(v) for v in state["meta"])
        self = cls(*(str(v) for v in state["names"]))
        if "cross" in state:
            self._init(*np.asarray(state["cross"]).shape, (H, W), device)
            for f in cls.FIELDS:
                getattr(self, f).copy_(torch.as_tensor(np.asarray(state[f], dtype=np.float64)))
        self.count, self.images = count, images
        return self

    def save(self, path: Path) -> None:
        write_npz(Path(path), self.state())

    @classmethod
    def load(cls, path: Path, device="cpu") -> "UnitCorrelation":
        with np.load(Path(path), allow_pickle=False) as z:
            return cls.from_state({k: z[k] for k in z.files}, device)

    # -- results -------------------------------------------------------------------------------------
    def _moments(self, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = max(self.count, 1)
        s = getattr(self, f"sum_{which}").cpu().numpy() / n
        var = getattr(self, f"sq_{which}").cpu().numpy() / n - s * s
        mean = getattr(self, f"shift_{which}").cpu().numpy() + s
        return s, var, ~(var > CONSTANT_TOL * (var + mean * mean))

    def correlation(self) -> np.ndarray:
        """``(C_a, C_b)`` Pearson correlations; NaN in the rows and columns of constant units."""
        if self.units is None:
            return np.zeros((0, 0))
        n = self.count
        sa, va, ca = self._moments("a")
        sb, vb, cb = self._moments("b")
        cov = self.cross.cpu().numpy() / n - sa[:, None] * sb[None, :]
        va, vb = np.where(ca, np.nan, va), np.where(cb, np.nan, vb)
        with np.errstate(invalid="ignore"):
            r = cov / np.sqrt(va[:, None] * vb[None, :])
        return np.clip(r, -1.0, 1.0)

    def best_match(self, of: str = "a") -> pd.DataFrame:
        """Semi-matching (Li et al. 2016): for each unit of layer A (``of="a"``; ``"b"``: of layer B) its most
        correlated unit of the other layer. Columns ``unit_a``, ``unit_b`` (nullable: missing for a constant
        unit, or when every partner is constant), ``corr``; one row per unit of ``of``."""
        if of not in ("a", "b"):
            raise ValueError(f"of: '{of}' is not allowed; allowed: a, b")
        r = self.correlation()
        r = r if of == "a" else r.T
        units = np.arange(r.shape[0])
        ok = ~np.isnan(r).all(1) if r.shape[1] else np.zeros(len(units), bool)
        partner = np.full(len(units), -1)
        partner[ok] = np.nanargmax(r[ok], axis=1)
        corr = np.where(ok, r[units, np.maximum(partner, 0)] if r.shape[1] else np.nan, np.nan)
        return self._frame(units, partner, corr, swap=of == "b")

    def one_to_one(self) -> pd.DataFrame:
        """Bipartite matching (Li et al. 2016): the one-to-one pairing of A's and B's units that maximises the
        total correlation (:func:`scipy.optimize.linear_sum_assignment` over the non-constant units; with
        ``C_a > C_b`` some of A's units stay unmatched). One row per unit of A: ``unit_a``, ``unit_b``
        (nullable), ``corr``."""
        from scipy.optimize import linear_sum_assignment

        r = self.correlation()
        rows = np.flatnonzero(~np.isnan(r).all(1)) if r.size else np.zeros(0, int)
        cols = np.flatnonzero(~np.isnan(r).all(0)) if r.size else np.zeros(0, int)
        partner = np.full(r.shape[0], -1)
        if len(rows) and len(cols):
            i, j = linear_sum_assignment(r[np.ix_(rows, cols)], maximize=True)
            partner[rows[i]] = cols[j]
        units = np.arange(r.shape[0])
        corr = np.where(partner >= 0, r[units, np.maximum(partner, 0)] if r.shape[1] else np.nan, np.nan)
        return self._frame(units, partner, corr, swap=False)

    def permutation(self) -> np.ndarray:
        """``perm (C_a,)``: the unit of B matched one-to-one to each unit of A (-1: unmatched), so that
        ``b[:, perm]`` lines B's channels up with A's when every unit is matched."""
        return self.one_to_one()["unit_b"].fillna(-1).to_numpy(dtype=np.int64)

    @staticmethod
    def _frame(units, partner, corr, swap: bool) -> pd.DataFrame:
        other = pd.array(np.where(partner >= 0, partner, 0), dtype="Int64")
        other[partner < 0] = pd.NA
        mine = pd.array(units, dtype="Int64")
        a, b = (other, mine) if swap else (mine, other)
        return pd.DataFrame({"unit_a": a, "unit_b": b, "corr": corr.astype(np.float64)})

    def summary(self) -> dict:
        """Headline numbers: ``units_a``, ``units_b``, ``constant_a``, ``constant_b``, and for ``semi`` (A's
        units to B's) and ``one_to_one``: the mean correlation of the matched units and the fraction of all of
        A's units matched above 0.5 and above 0.8 (``semi_frac_above_0.5`` ...)."""
        out: dict = {"layer_a": self.name_a, "layer_b": self.name_b, "images": self.images}
        if self.units is None:
            return out
        out.update({"units_a": self.units[0], "units_b": self.units[1],
                    "constant_a": int(self._moments("a")[2].sum()), "constant_b": int(self._moments("b")[2].sum())})
        for name, frame in (("semi", self.best_match("a")), ("one_to_one", self.one_to_one())):
            c = frame["corr"].to_numpy()
            matched = c[~np.isnan(c)]
            out[f"{name}_mean_corr"] = float(matched.mean()) if len(matched) else math.nan
            for t in THRESHOLDS:
                out[f"{name}_frac_above_{t}"] = float((matched > t).sum() / len(c)) if len(c) else math.nan
        return out
