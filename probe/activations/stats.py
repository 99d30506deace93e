"""Streaming, mergeable per-channel statistics of a layer's activations.

One :class:`LayerStats` per layer. ``update(x, y, top, start)`` takes a batch ``(N, C, H, W)``
(linear layers: ``(N, F)``, i.e. ``F`` channels with one position) and its labels, and does the
work on ``x``'s device with no host sync: per image and channel the spatial sum, the sum of
squares, the active count, the min and the max (with its location), a fine histogram on the fixed
:class:`~probe.activations.grid.LogGrid`, and the top-k exemplars in ``top``. On a CPU one compiled
call per layer and batch does it all (:mod:`probe.activations.kernel`); elsewhere one torch op per
statistic, with an integer shift and an integer ``index_add_`` for the histogram. Memory is fixed
by the layer's shape, never by the number of images.

Definitions (over every position of every image; ``count = images * H * W``):

- ``mean``, ``std``: population mean and standard deviation (ddof=0), from float64 sums of the
  per-image sums and sums of squares about a per-channel shift (the first batch's channel
  mean), so that a channel with a large mean and a small spread keeps its digits.
- ``min``, ``max``: exact. ``frac_active``: fraction of positions with x > 0 of the layer's own
  output (exact, counted at every position, whatever ``hist_stride``).
- ``rectified``: the layer's rectified response (:mod:`probe.activations.rectified`): ``"relu"``,
  ``"relu6"`` (its output goes into that rectifier), ``"bn+relu"``, ``"bn+relu6"`` (through an eval-mode
  BatchNorm, ``clamp(a_c (x - m_c) + beta_c, 0, cap)``), ``"self"`` (the layer is a rectifier) or null: none.
  Dead units and class selectivity are defined only where it is not null (NaN / null elsewhere).
- ``dead``: the rectified response is never > 0 on the whole population; exact, from the channel's
  min and max (the response is monotone in x: at ``max`` for ``a > 0``, ``min`` for ``a < 0``, constant for ``a = 0``).
- ``frac_active_rectified``: fraction of positions where the rectified response is > 0 (exact count).
- ``q01``, ``q50``, ``q99``: from the fine histogram; each lies in the grid bin of the order
  statistic at rank ``floor(q (n - 1))`` (numpy's interpolated quantile lies between that and the
  next order statistic), so the error is at most one bin (plus that gap): relative
  ``2^-bits`` of the value (bits=4: 6.25%), or ``2^-octaves`` absolute near zero.
  With ``hist_stride > 1`` the histogram (hence quantiles and hist.parquet) counts every
  ``hist_stride``-th position of each flattened map only: still exactly mergeable, but quantiles
  of a fixed spatial subsample.
- ``selectivity``: class selectivity index (Morcos, Barrett, Rabinowitz & Botvinick 2018, "On the
  importance of single directions for generalization", section 2.3), defined there for the
  non-negative activity of ReLU units: from the per-class mean of the *rectified* response
  ``mu_k`` (mean over all positions of all images of class k, the map averaged first as in the
  paper; classes with images only): ``(mu_max - mu_rest) / (mu_max + mu_rest)`` with ``mu_rest``
  the mean of the other classes' means. In [0, 1]: 0 = the same mean for every class, 1 = active
  for one class only. NaN where the layer has no rectified response, where ``mu_max + mu_rest <=
  1e-12`` (a dead channel) or with fewer than two classes. class_means.parquet has both the raw
  ``mean`` and ``mean_rectified`` (null where undefined) per class and channel.

Merging: counts, min, max and histograms merge exactly; sums in float64 to rounding.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe.activations.exemplars import BatchSummary, TopK
from probe.activations.grid import LogGrid
from probe.activations.kernel import reduce_batch, state_views
from probe.activations.rectified import Rectified
from probe.files import write_bytes

QUANTILES = (0.01, 0.5, 0.99)
FUSED_CPU = True  # CPU batches go through the one-pass numba kernel (tests also run the torch ops on CPU)


def as_maps(name: str, out: torch.Tensor) -> torch.Tensor:
    """A layer output as float32 ``(N, C, H, W)``; linear ``(N, F)`` becomes ``(N, F, 1, 1)``."""
    from probe.errors import ConfigError

    if out.dim() == 2:
        out = out[:, :, None, None]
    elif out.dim() != 4:
        raise ConfigError(f"layers: '{name}' outputs shape {tuple(out.shape)}; activations reads (N, C, H, W) or (N, F) outputs")
    return out.float()


class LayerStats:
    """Streaming statistics of one layer; state lives on the device of the first batch."""

    FIELDS = ("shift", "sum", "sumsq", "min", "max", "hist", "active", "class_sum", "class_images", "class_rect",
              "active_rect")

    def __init__(self, name: str, grid: LogGrid, num_classes: int, hist_stride: int = 1,
                 rectified: Rectified | None = None):
        self.name, self.grid, self.num_classes, self.hist_stride = name, grid, num_classes, hist_stride
        self.rectified = rectified  # the layer's rectified response, None: undefined (set before the first batch)
        self.channels: int | None = None
        self.shape: tuple[int, int] | None = None  # (H, W)
        self.count = 0  # positions per channel
        self.hist_count = 0  # positions per channel in the histogram
        self.images = 0
        self._arrays: tuple | None = None  # the CPU kernel's views of this layer's state and its TopK

    def _init(self, C: int, H: int, W: int, device: torch.device) -> None:
        self.channels, self.shape, self.device = C, (H, W), device
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.sum = torch.zeros(C, **f64)
        self.sumsq = torch.zeros(C, **f64)  # sum of (x - shift)^2
        self.shift = torch.zeros(C, dtype=torch.float32, device=device)
        self.min = torch.full((C,), float("inf"), dtype=torch.float32, device=device)
        self.max = torch.full((C,), float("-inf"), dtype=torch.float32, device=device)
        self.hist = torch.zeros(C, self.grid.bins, **i64)
        self.active = torch.zeros(C, **i64)
        self.class_sum = torch.zeros(self.num_classes, C, **f64)
        self.class_images = torch.zeros(self.num_classes, **i64)
        # the rectified response's class sums and active count (zero where the layer has none)
        self.class_rect = torch.zeros(self.num_classes, C, **f64)
        self.active_rect = torch.zeros(C, **i64)
        a, m, b = self.rectified.affine(C) if self.rectified is not None else (np.ones(C), np.zeros(C), np.zeros(C))
        self.rect_scale, self.rect_center, self.rect_offset = (torch.tensor(v, **f64) for v in (a, m, b))
        self.rect_cap = self.rectified.cap if self.rectified is not None else float("inf")
        self._lut = self.grid.table(device)
        g = self.grid
        # offsets for the two histogram paths of the torch reduction (see _histogram)
        channel = torch.arange(C, device=device).view(1, C, 1)
        self._raw_offsets = (channel * g.raw_bins + g.half).to(torch.int32)
        self._bin_offsets = channel * g.bins
        self._one = torch.ones(1, dtype=torch.int64, device=device)
        self._classes = torch.arange(self.num_classes, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, top: TopK, start: int) -> None:
        """Add a batch to the statistics and to ``top``: ``x`` float32 ``(N, C, H, W)``, ``y`` ``(N,)``
        int64 labels on ``x``'s device, ``start`` the index of its first image."""
        N, C, H, W = x.shape
        if self.channels is None:
            self._init(C, H, W, x.device)
            self.shift = x.mean((0, 2, 3))
        elif (C, (H, W)) != (self.channels, self.shape):
            raise ValueError(f"{self.name}: batch of shape {tuple(x.shape)} after maps of {self.channels}x{self.shape}")
        xf = x.reshape(N, C, H * W)
        if x.device.type == "cpu" and FUSED_CPU:
            if self._arrays is None:
                if top.kept is None:
                    top._init(C, x.device)
                self._arrays = state_views(self, top)
            reduce_batch(xf, y, start, self._arrays)
            top.ranked += N
            self.hist_count += N * len(range(0, H * W, self.hist_stride))
        else:
            top.update(self._reduce_torch(xf, y), start)
        self.count += N * H * W
        self.images += N

    def _reduce_torch(self, xf: torch.Tensor, y: torch.Tensor) -> BatchSummary:
        """What :func:`~probe.activations.kernel.reduce_batch` does, with torch ops on ``xf``'s device."""
        C, P = xf.shape[1:]
        if not xf.is_contiguous():
            xf = xf.contiguous()
        s = xf.sum(2, dtype=torch.float64)  # (N, C)
        self.sum += s.sum(0)
        self.sumsq += torch.linalg.vector_norm(xf - self.shift.view(1, C, 1), dim=2).square_().sum(0, dtype=torch.float64)
        # class sums: finite ones by a matmul with a one-hot made by comparison (F.one_hot and
        # bincount read the labels' max back to the host: a sync per batch on CUDA), not by
        # index_add_ (float atomics are not deterministic on CUDA); non-finite ones by index_add_
        # (NaN / inf sums come out the same in any order), so that they reach their own class only
        onehot = (y[:, None] == self._classes).to(torch.float64)  # (N, K)
        self._class_add(self.class_sum, onehot, y, s)
        self.class_images += onehot.sum(0).to(torch.int64)
        if self.rectified is not None:
            if self.rectified.scale is None:  # max(x, 0): exact in float32
                r = xf.clamp(0, self.rect_cap)
            else:  # float32 here, as the BN computes it (the kernel's is float64: they agree to float32 rounding)
                r = torch.addcmul(self.rect_offset.float().view(1, C, 1), xf - self.rect_center.float().view(1, C, 1),
                                  self.rect_scale.float().view(1, C, 1))
                r.clamp_(0, self.rect_cap)
            self._class_add(self.class_rect, onehot, y, r.sum(2, dtype=torch.float64))
            self.active_rect += (r > 0).sum((0, 2))
        torch.minimum(self.min, xf.amin((0, 2)), out=self.min)
        mx, am = xf.max(2)
        torch.maximum(self.max, mx.amax(0), out=self.max)
        self._histogram(xf)
        return BatchSummary((s / P).float(), mx, am)

    @staticmethod
    def _class_add(acc: torch.Tensor, onehot: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> None:
        """``acc[y[n]] += s[n]``: finite sums by a matmul with the one-hot, non-finite ones by index_add_."""
        finite = s.isfinite()
        acc += onehot.T @ s.where(finite, 0.0)
        acc.index_add_(0, y, s.where(~finite, 0.0))

    def _histogram(self, xf: torch.Tensor) -> None:
        g, (N, C, _) = self.grid, xf.shape
        self.active += (xf > 0).sum((0, 2))
        if self.hist_stride > 1:
            xf = xf[:, :, :: self.hist_stride]
        keys = g.keys(xf)  # (N, C, P') int32
        if keys.shape[0] * keys.shape[2] >= g.raw_bins:
            # many values per channel: count (channel, raw key) pairs, then fold raw keys into bins
            keys += self._raw_offsets
            keys = keys.reshape(-1)
            raw = torch.zeros(C * g.raw_bins, dtype=torch.int64, device=keys.device)
            raw.index_add_(0, keys, self._one.expand(len(keys)))  # integer adds: same result in any order
            self.hist.index_add_(1, self._lut, raw.view(C, g.raw_bins))
        else:  # few values per channel: map them through the table and add them in place (no C x raw zeroing)
            keys += g.half
            idx = self._lut[keys]
            idx += self._bin_offsets
            idx = idx.reshape(-1)
            self.hist.view(-1).index_put_((idx,), self._one.expand(len(idx)), accumulate=True)
        self.hist_count += N * keys.shape[2]

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Add ``other`` (statistics of other images of the same layer) into this one; returns self."""
        if other.channels is None:
            return self
        if self.channels is None:
            self.rectified = self.rectified or other.rectified
            self._init(other.channels, *other.shape, other.device)
        if (self.channels, self.shape, self.grid, self.hist_stride) != (other.channels, other.shape, other.grid, other.hist_stride):
            raise ValueError(f"{self.name}: cannot merge statistics of different shapes, grids or strides")
        if not _same_rectified(self.rectified, other.rectified):
            raise ValueError(f"{self.name}: cannot merge statistics of different rectified responses "
                             f"({_describe(self.rectified)} and {_describe(other.rectified)})")
        # move other's squares to this shift: sum (x-a)^2 = sum (x-b)^2 + 2 (b-a) sum (x-b) + n (b-a)^2
        a, b = self.shift.to(torch.float64), other.shift.to(self.device, torch.float64)
        below = other.sum.to(self.device) - other.count * b
        self.sumsq += other.sumsq.to(self.device) + 2 * (b - a) * below + other.count * (b - a) ** 2
        self.sum += other.sum.to(self.device)
        torch.minimum(self.min, other.min.to(self.device), out=self.min)
        torch.maximum(self.max, other.max.to(self.device), out=self.max)
        for f in ("hist", "active", "class_sum", "class_images", "class_rect", "active_rect"):
            getattr(self, f).add_(getattr(other, f).to(self.device))
        self.count += other.count
        self.hist_count += other.hist_count
        self.images += other.images
        return self

    # -- state (for sharding: save, load, merge) ---------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        meta = np.array([self.count, self.hist_count, self.images, self.num_classes, self.hist_stride,
                         self.grid.bits, self.grid.octaves, *(self.shape or (0, 0))], dtype=np.int64)
        out = {"meta": meta}
        if self.rectified is not None:
            out.update({f"rect_{k}": v for k, v in self.rectified.state().items()})
        if self.channels is not None:
            out.update({f: getattr(self, f).cpu().numpy() for f in self.FIELDS})
        return out

    @classmethod
    def from_state(cls, name: str, state: dict[str, np.ndarray], device="cpu") -> "LayerStats":
        count, hist_count, images, K, stride, bits, octaves, H, W = (int(v) for v in state["meta"])
        rect = {k[5:]: v for k, v in state.items() if k.startswith("rect_")}
        self = cls(name, LogGrid(bits, octaves), K, stride, Rectified.from_state(rect) if rect else None)
        if "sum" in state:
            missing = [f for f in cls.FIELDS if f not in state]
            if missing:
                raise ValueError(f"{name}: state lacks {', '.join(missing)} (written by an older probe: recompute it)")
            self._init(len(state["sum"]), H, W, torch.device(device))
            for f in cls.FIELDS:
                getattr(self, f).copy_(torch.as_tensor(state[f]))
        self.count, self.hist_count, self.images = count, hist_count, images
        return self

    # -- results --------------------------------------------------------------------------------
    def frac_active(self) -> np.ndarray:
        return self.active.cpu().numpy() / max(self.count, 1)

    def class_means(self, rectified: bool = False) -> np.ndarray:
        """``(num_classes, C)`` mean activation per class (NaN for classes without images); with
        ``rectified`` of the rectified response (all NaN where the layer has none)."""
        n = self.class_images.cpu().numpy().astype(np.float64) * (self.shape[0] * self.shape[1])
        if rectified and self.rectified is None:
            return np.full((self.num_classes, self.channels), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.class_rect if rectified else self.class_sum).cpu().numpy() / n[:, None]

    def dead(self) -> np.ndarray | None:
        """Per channel: the rectified response never > 0 (None where the layer has no rectified response)."""
        if self.rectified is None:
            return None
        return self.rectified.dead(self.min.cpu().numpy(), self.max.cpu().numpy())

    def to_frame(self) -> pd.DataFrame:
        """One row per channel: count, mean, std, min, max, q01, q50, q99, frac_active, rectified,
        frac_active_rectified, dead (nullable boolean), selectivity (see the module docstring)."""
        n = max(self.count, 1)
        mean = self.sum.cpu().numpy() / n
        var = np.maximum(self.sumsq.cpu().numpy() / n - (mean - self.shift.cpu().numpy().astype(np.float64)) ** 2, 0.0)
        mn, mx = self.min.cpu().numpy().astype(np.float64), self.max.cpu().numpy().astype(np.float64)
        q = hist_quantiles(self.hist.cpu().numpy(), self.grid, QUANTILES, mn, mx)
        frame = pd.DataFrame({
            "layer": self.name, "channel": np.arange(self.channels), "count": np.int64(self.count),
            "mean": mean, "std": np.sqrt(var), "min": mn, "max": mx,
            **{f"q{round(p * 100):02d}": q[:, i] for i, p in enumerate(QUANTILES)},
            "frac_active": self.frac_active(),
            "rectified": pd.array([self.rectified.kind if self.rectified else None] * self.channels, dtype="string"),
            "frac_active_rectified": self.active_rect.cpu().numpy() / n if self.rectified else np.nan,
            "dead": pd.array(self.dead() if self.rectified else [None] * self.channels, dtype="boolean"),
            "selectivity": selectivity(self.class_means(rectified=True)),
        })
        return frame

    def class_frame(self) -> pd.DataFrame:
        cm = self.class_means()
        K, C = cm.shape
        return pd.DataFrame({"layer": self.name, "channel": np.tile(np.arange(C), K),
                             "class": np.repeat(np.arange(K), C), "mean": cm.reshape(-1),
                             "mean_rectified": self.class_means(rectified=True).reshape(-1)})

    def hist_frame(self, per_channel: bool = False) -> pd.DataFrame:
        """Non-empty bins of the layer's histogram (``channel`` -1), and of every channel if asked."""
        h = self.hist.cpu().numpy()
        parts = [(-1, h.sum(0))] + ([(c, h[c]) for c in range(len(h))] if per_channel else [])
        rows = []
        for c, counts in parts:
            nz = np.flatnonzero(counts)
            rows.append(pd.DataFrame({"layer": self.name, "channel": c, "bin": nz, "lo": self.grid.lo[nz],
                                      "hi": self.grid.hi[nz], "count": counts[nz]}))
        return pd.concat(rows, ignore_index=True)


def _same_rectified(a: Rectified | None, b: Rectified | None) -> bool:
    return (a is None and b is None) or (a is not None and a.same(b))


def _describe(r: Rectified | None) -> str:
    return "none" if r is None else r.kind + (f" via {r.via}" if r.via else "")


def selectivity(class_means: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Class selectivity index per channel (Morcos et al. 2018, section 2.3) from ``(K, C)`` class means of
    a non-negative (rectified) response; NaN rows = absent classes. In [0, 1] for non-negative means."""
    cm = class_means[~np.isnan(class_means).any(1)]
    if len(cm) < 2:
        return np.full(class_means.shape[1], np.nan)
    top = cm.max(0)
    rest = (cm.sum(0) - top) / (len(cm) - 1)
    den = top + rest
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > eps, (top - rest) / np.where(den > eps, den, 1.0), np.nan)


def hist_quantiles(hist: np.ndarray, grid: LogGrid, qs, mn: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """Quantiles ``(C, len(qs))`` from per-channel grid histograms ``(C, B)``, within one bin of exact.

    The bin holding the order statistic of rank ``floor(q (n - 1))`` is found from the cumulative
    counts; inside it the value is interpolated as if its counts were spread evenly, and clipped
    to the channel's exact [min, max] (which also replaces the infinite edges of overflow bins).
    """
    C = hist.shape[0]
    cum = np.cumsum(hist, axis=1)
    n = cum[:, -1].astype(np.float64)
    out = np.full((C, len(qs)), np.nan)
    lo = np.where(np.isfinite(grid.lo)[None, :], grid.lo[None, :], mn[:, None])
    hi = np.where(np.isfinite(grid.hi)[None, :], grid.hi[None, :], mx[:, None])
    rows = np.arange(C)
    for i, q in enumerate(qs):
        r = q * (n - 1)
        b = np.minimum((cum <= r[:, None]).sum(1), hist.shape[1] - 1)
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        inside = hist[rows, b].astype(np.float64)
        frac = np.clip((r - before + 0.5) / np.maximum(inside, 1), 0, 1)
        v = lo[rows, b] + frac * (hi[rows, b] - lo[rows, b])
        out[:, i] = np.where(n > 0, np.clip(v, mn, mx), np.nan)
    return out


class PopulationStats:
    """The statistics of several layers over a population of images: :class:`LayerStats` and the
    :class:`~probe.activations.exemplars.TopK` exemplars per layer, merged and saved together.

    ``stats["conv1"]`` is a layer's :class:`LayerStats`, ``stats.exemplars["conv1"]`` its exemplars,
    :meth:`table` every layer's per-channel table. Two populations (shards of one dataset) merge into what
    one pass over both gives (:meth:`merge`); :meth:`save` / :meth:`load` write and read them as one npz
    (arrays ``stats/<layer>/<field>``, ``topk/<layer>/<field>``, ``topk/<layer>/k`` and ``layers``, their order).
    """

    def __init__(self, layers: dict[str, LayerStats], exemplars: dict[str, TopK] | None = None):
        self.layers = layers
        self.exemplars: dict[str, TopK] = exemplars or {}

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def table(self) -> pd.DataFrame:
        """:meth:`LayerStats.to_frame` of every layer that saw a batch, one row per layer and channel."""
        return pd.concat([s.to_frame() for s in self.layers.values() if s.channels is not None], ignore_index=True)

    def merge(self, other: "PopulationStats") -> "PopulationStats":
        """Add ``other`` (the same layers on other images) into this one, exemplars included; returns self."""
        for name, s in other.layers.items():
            if name in self.layers:
                self.layers[name].merge(s)
            else:
                self.layers[name] = s
        for name, t in other.exemplars.items():
            if name in self.exemplars:
                self.exemplars[name].merge(t)
            else:
                self.exemplars[name] = t
        return self

    def save(self, path: Path) -> None:
        """Write every layer's state (and its exemplars) to the npz ``path``, atomically."""
        arrays = {f"stats/{name}/{k}": v for name, s in self.layers.items() for k, v in s.state().items()}
        arrays["layers"] = np.array(list(self.layers), dtype=str)
        for name, t in self.exemplars.items():
            arrays[f"topk/{name}/k"] = np.array(t.k, dtype=np.int64)
            arrays.update({f"topk/{name}/{k}": v for k, v in t.state().items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # not probe.files.write_npz: it stores 0-d arrays (a rectifier's kind, cap) as 1-d
        write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path, device="cpu") -> "PopulationStats":
        """Read what :meth:`save` wrote."""
        grouped: dict[str, dict[str, dict]] = {"stats": {}, "topk": {}}
        with np.load(path) as z:
            if "layers" not in z.files:
                raise ValueError(f"{path}: not written by PopulationStats.save (no 'layers' array; an older probe's "
                                 "state: recompute it)")
            order = [str(n) for n in z["layers"]]
            for key in z.files:
                if key != "layers":
                    kind, rest = key.split("/", 1)
                    name, field = rest.rsplit("/", 1)
                    grouped[kind].setdefault(name, {})[field] = z[key]
        stats = {n: LayerStats.from_state(n, grouped["stats"][n], device) for n in order}
        tops = {n: TopK.from_state(n, int(grouped["topk"][n].pop("k")), grouped["topk"][n], device)
                for n in order if n in grouped["topk"]}
        return cls(stats, tops)
