"""The CPU statistics kernel: everything :class:`~probe.activations.stats.LayerStats` and its
:class:`~probe.activations.exemplars.TopK` accumulate from a batch, in one compiled call per layer.

On a CPU the statistics pass is bound by memory traffic and by per-call overhead, not arithmetic:
a plain forward pass writes each activation once, and reducing it with one torch op per statistic
(sum, squares, min, max + argmax, histogram key, bincount, class sums, top-k) reads it again six to
nine times and pays a dispatch per op, which dominates on layers with many channels and small maps.
Here one numba-compiled function does, per (image, channel) row: one vectorised pass for the
float64 sum, the sum of squares, the active count and the min and max (compared as order-preserving
integers made from the float bits), a scan that stops at the first max, where the layer has a
rectified response (:mod:`probe.activations.rectified`) a pass over the cached row for its class
sum and active count, and one pass for the histogram (interleaved int32 sub-histograms, so that
runs of equal values do not wait on each other's increments); then it inserts the image into the channel's top-k if it ranks. Channels are
split across threads; each channel is reduced by one thread in a fixed order, so results do not
depend on the number of threads. On CUDA, :mod:`probe.activations.stats` uses torch ops on the
device instead; tests hold both to the same brute-force results and to each other.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from probe.activations.exemplars import COLUMNS

# no "nnan": NaN must still compare unequal; "reassoc" lets the sums vectorise (the order is fixed
# by the compiled code, so results stay deterministic)
_FAST = {"reassoc", "contract", "nsz"}
SUB = 4  # (unrolled in _count) interleaved sub-histograms per channel, used when a batch has many values per channel


@njit(fastmath=_FAST, boundscheck=False, inline="always")
def _moments(x, bits, y, c, a, start, total, sumsq, active, class_sum, mins, maxs, key, val, mxv, amx, idx,
             rect, ra, rc, rb, cap, class_rect, active_rect):  # pragma: no cover - compiled
    """Channel ``c``, per image and in total: float64 sum, sum of squares about ``a``, active count,
    max (with its first position) and min. One vectorised pass per row: min and max are taken on
    the float bits made order-preserving integers, then a scan stops at the max. With ``rect``, a second
    pass over the (cached) row: the class sum and active count of the rectified response
    ``clamp(ra (x - rc) + rb, 0, cap)`` in float64 (NaN propagates: ``r < 0`` is false for NaN)."""
    N, _, P = x.shape
    s_c, sq_c, act_c, mx_c, mn_c, ract_c = 0.0, 0.0, 0, maxs[c], mins[c], 0
    scratch = np.empty(1, np.int32)  # to read int32 bits back as a float32
    scratch_f = scratch.view(np.float32)
    for n in range(N):
        nan = 1
        if P >= 16:  # vectorised (shorter rows: the scalar loop costs less than the vector set-up)
            s, sq, act, nan = 0.0, 0.0, 0, 0
            hi, lo = np.int32(-(2**31)), np.int32(2**31 - 1)
            for p in range(P):
                v = np.float64(x[n, c, p])
                s += v
                d = v - a
                sq += d * d
                act += x[n, c, p] > 0
                nan += x[n, c, p] != x[n, c, p]
                b = bits[n, c, p]
                o = b ^ ((b >> 31) & 0x7FFFFFFF)
                hi = max(hi, o)
                lo = min(lo, o)
            if nan == 0:
                scratch[0] = hi ^ ((hi >> 31) & 0x7FFFFFFF)
                top = scratch_f[0]
                am = 0
                for p in range(P):  # compared as floats: -0.0 == 0.0, as torch.max sees them
                    if x[n, c, p] == top:
                        am = p
                        break
                mx = x[n, c, am]
                scratch[0] = lo ^ ((lo >> 31) & 0x7FFFFFFF)
                mn = scratch_f[0]
        if nan:  # a short row, or one with a NaN: one scalar pass, NaN propagating as in torch
            s, sq, act = 0.0, 0.0, 0
            mx, am, mn = x[n, c, 0], 0, x[n, c, 0]
            for p in range(P):
                v32 = x[n, c, p]
                v = np.float64(v32)
                s += v
                d = v - a
                sq += d * d
                act += v32 > 0
                if v32 > mx or (v32 != v32 and mx == mx):
                    mx, am = v32, p
                if v32 < mn or v32 != v32:
                    mn = v32
        class_sum[y[n], c] += s
        if rect:
            rs, rac = 0.0, 0
            for p in range(P):
                r = ra * (np.float64(x[n, c, p]) - rc) + rb
                r = 0.0 if r < 0.0 else r
                r = cap if r > cap else r
                rs += r
                rac += r > 0.0
            class_rect[y[n], c] += rs
            ract_c += rac
        _rank(key, val, mxv, amx, idx, c, np.float32(s / P), mx, am, start + n, scratch, scratch_f)
        s_c += s
        sq_c += sq
        act_c += act
        if mx > mx_c or (mx != mx and mx_c == mx_c):
            mx_c = mx
        if mn < mn_c or mn != mn:
            mn_c = mn
    total[c] += s_c
    sumsq[c] += sq_c
    active[c] += act_c
    maxs[c] = mx_c
    mins[c] = mn_c
    active_rect[c] += ract_c


@njit(boundscheck=False, inline="always")
def _rank(key, val, mxv, amx, idx, c, value, mx, am, index, bits, floats):  # pragma: no cover - compiled
    """Insert image ``index`` into channel ``c`` of the top-k columns (each (k, C), sorted by key) if it
    ranks; the key is :func:`probe.activations.exemplars.rank_key`'s (``bits``/``floats``: one scratch
    word seen as int32 and as float32). Inlined: a call would pass (and count references to) seven arrays per row."""
    floats[0] = np.float32(np.inf) if value != value else value  # NaN ranks as +inf
    b = bits[0]
    if b == np.int32(-(2**31)):  # -0.0 as +0.0 (on the bits: fastmath may drop a "+ 0.0")
        b = np.int32(0)
    kk = (np.int64(b ^ ((b >> 31) & 0x7FFFFFFF)) << 32) | (0xFFFFFFFF - index)
    j = key.shape[0] - 1
    if kk <= key[j, c]:
        return
    while j > 0 and key[j - 1, c] < kk:
        key[j, c], val[j, c], mxv[j, c], amx[j, c], idx[j, c] = key[j - 1, c], val[j - 1, c], mxv[j - 1, c], amx[j - 1, c], idx[j - 1, c]
        j -= 1
    key[j, c], val[j, c], mxv[j, c], amx[j, c], idx[j, c] = kk, value, mx, am, index


@njit(boundscheck=False, inline="always")
def _count(bits, c, lut, k, stride, h, row, rows):  # pragma: no cover - compiled
    """Histogram of every ``stride``-th value of channel ``c`` into ``h[row]``, or with ``rows`` = SUB - 1
    into the sub-histograms ``h[row + p % SUB]`` in turn."""
    N, _, P = bits.shape
    for n in range(N):
        if stride == 1 and rows == SUB - 1:  # unrolled: four independent increments
            q = P - P % SUB
            for p in range(0, q, SUB):
                h[row, np.intp(lut[bits[n, c, p] >> k])] += 1
                h[row + 1, np.intp(lut[bits[n, c, p + 1] >> k])] += 1
                h[row + 2, np.intp(lut[bits[n, c, p + 2] >> k])] += 1
                h[row + 3, np.intp(lut[bits[n, c, p + 3] >> k])] += 1
            for p in range(q, P):
                h[row, np.intp(lut[bits[n, c, p] >> k])] += 1
        else:
            for p in range(0, P, stride):
                h[row, np.intp(lut[bits[n, c, p] >> k])] += 1


def _compiled(fn):
    """njit with numba's on-disk cache, which numba puts next to this module, in NUMBA_CACHE_DIR or in
    the user's cache folder. Where none is writable (a read-only install without a home) numba refuses
    to cache when the function is decorated, which would fail the import: compile in memory instead."""
    options = dict(parallel=True, nogil=True, fastmath=_FAST, boundscheck=False)
    try:
        return njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(**options)(fn)


@_compiled
def _reduce(x, y, start, lut, key_shift, stride, rect, rscale, rcenter, roffset, cap, shift, total, sumsq, mins, maxs, hist,
            active, class_sum, class_images, class_rect, active_rect, key, val, mxv, amx, idx):  # pragma: no cover - compiled
    N, C, P = x.shape
    for n in range(N):  # before anything is added
        if y[n] < 0 or y[n] >= class_images.shape[0]:
            raise ValueError("activations: a label is outside [0, number of classes)")
    for n in range(N):
        class_images[y[n]] += 1
    bits = x.view(np.int32)
    ubits = x.view(np.uint32)
    k = np.uint32(key_shift)
    bins = hist.shape[1]
    many = stride == 1 and N * P >= SUB * bins  # else zeroing and folding sub-histograms costs more
    for c in prange(C):
        _moments(x, bits, y, c, np.float64(shift[c]), start, total, sumsq, active, class_sum, mins, maxs, key, val, mxv,
                 amx, idx, rect, rscale[c], rcenter[c], roffset[c], cap, class_rect, active_rect)
        if many:
            sub = np.zeros((SUB, bins), np.int32)
            _count(ubits, c, lut, k, stride, sub, 0, SUB - 1)
            for j in range(SUB):
                for i in range(bins):
                    hist[c, i] += sub[j, i]
        else:
            _count(ubits, c, lut, k, stride, hist, c, 0)


def unsigned_table(lut: np.ndarray, half: int) -> np.ndarray:
    """The grid's lookup table re-indexed by the unsigned key (``uint32 bits >> shift``), as uint16 if it fits."""
    table = lut[np.arange(len(lut)) ^ half]
    return table.astype(np.uint16 if table.max() < 1 << 16 else np.int32)


def state_views(stats, top) -> tuple:
    """The arrays :func:`reduce_batch` updates in place, after the grid's table, key shift, the histogram
    stride and the rectified response (on/off, per-channel scale, center and offset, cap): numpy views of the
    CPU tensors of a :class:`~probe.activations.stats.LayerStats` (its ``FIELDS``) and of the columns
    of its :class:`~probe.activations.exemplars.TopK` (key, then ``COLUMNS``); taken once, at the first batch."""
    g = stats.grid
    return (unsigned_table(g.lut, g.half), g.shift, stats.hist_stride, stats.rectified is not None,
            stats.rect_scale.numpy(), stats.rect_center.numpy(), stats.rect_offset.numpy(), float(stats.rect_cap),
            *(getattr(stats, f).numpy() for f in stats.FIELDS), *(top.kept[c].numpy() for c in ("key", *COLUMNS)))


def reduce_batch(xf: torch.Tensor, y: torch.Tensor, start: int, arrays: tuple) -> None:
    """Add the batch ``xf`` float32 ``(N, C, P)`` with labels ``y``, first image ``start``, to
    :func:`state_views` in place. NaN propagates to the sums, min and max as in torch, is counted
    in an overflow bin of the histogram and ranks as +inf."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _reduce(xf.contiguous().numpy(), y.numpy(), start, *arrays)
