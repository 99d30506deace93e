"""A fixed, data-independent, symmetric log-scale histogram grid read straight from float32 bits.

Why: fixed edges make histograms of two shards add up exactly to the histogram of both, and
a grid that does not depend on the data needs no calibration pass. Reading the bin from the
float's bits costs one shift per element (no log, no binary search).

A float32 is sign | 8 exponent bits E | 23 mantissa bits. Keeping the top ``bits`` mantissa bits
(``b >> (23 - bits)`` on the int32 view) splits every octave [2^e, 2^(e+1)) into ``2^bits``
equal bins: relative bin width <= 2^-bits (bits=4: 6.25%). Octaves ``[2^-octaves, 2^octaves)`` on
both signs are kept; beyond them sit one "tiny" bin per sign, one overflow bin per sign (its outer
edge infinite, NaN counts there) and one bin for +0.0. The raw shifted keys (``2^(9+bits)`` per
channel) are mapped to the final, value-ordered bins by a lookup table.

Final bins, in increasing value: ``[neg overflow] [negative normal bins, large to small magnitude]
[neg tiny, incl. -0.0] [zero: +0.0 and positive subnormals < 2^-129] [pos tiny] [positive normal]
[pos overflow]``. ``active`` (x > 0) is the sum of the bins from ``pos tiny`` on.
"""

from __future__ import annotations

import numpy as np
import torch


class LogGrid:
    def __init__(self, bits: int = 4, octaves: int = 20):
        if not 1 <= bits <= 8 or not 1 <= octaves <= 126:
            raise ValueError(f"LogGrid: bits must be in 1..8 and octaves in 1..126; got {bits}, {octaves}")
        self.bits, self.octaves = bits, octaves
        self.shift = 23 - bits
        self.raw_bins = 1 << (9 + bits)  # keys of (b >> shift) + half, for every float32
        self.half = 1 << (8 + bits)
        self.normal = 2 * octaves << bits  # normal bins per sign
        self.bins = 2 * self.normal + 5
        self.first_active = self.normal + 3
        self.lut = self._lookup()
        self.lo, self.hi = self._edges()

    def __eq__(self, other) -> bool:
        return isinstance(other, LogGrid) and (self.bits, self.octaves) == (other.bits, other.octaves)

    def __repr__(self) -> str:
        return f"LogGrid(bits={self.bits}, octaves={self.octaves})"

    def _lookup(self) -> np.ndarray:
        """Raw key -> final bin index, ``(raw_bins,)`` int64."""
        j = np.arange(self.raw_bins, dtype=np.int64)
        positive = j >= self.half
        u = np.where(positive, j - self.half, j)  # (E << bits) | M
        e_lo, e_hi = (127 - self.octaves) << self.bits, (127 + self.octaves) << self.bits
        t = u - e_lo  # position among the normal bins of one sign
        G = self.normal
        pos = np.select([u >= e_hi, u >= e_lo, u > 0], [2 * G + 4, G + 4 + t, G + 3], default=G + 2)
        neg = np.select([u >= e_hi, u >= e_lo], [0, G - t], default=G + 1)
        return np.where(positive, pos, neg)

    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper edge of every final bin, float64 (positive bins are [lo, hi), negative (lo, hi])."""
        G, m = self.normal, self.bits
        t = np.arange(G)
        e = (t >> m) - self.octaves
        frac = (t & ((1 << m) - 1)) / (1 << m)
        plo, phi = np.ldexp(1 + frac, e), np.ldexp(1 + frac + 2.0**-m, e)
        tiny, big = 2.0 ** -self.octaves, 2.0**self.octaves
        lo = np.concatenate([[-np.inf], -phi[::-1], [-tiny, 0.0, 0.0], plo, [big]])
        hi = np.concatenate([[-big], -plo[::-1], [0.0, 0.0, tiny], phi, [np.inf]])
        return lo, hi

    def table(self, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(self.lut, device=device)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Raw keys of a float32 tensor, same shape, int32, in [-half, half) (add ``half`` to index)."""
        return torch.bitwise_right_shift(x.view(torch.int32), self.shift)

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """Final bin of each float32 value, by comparison with the float64 edges (the slow, independent way)."""
        v = np.asarray(values, dtype=np.float32).astype(np.float64)
        G = self.normal
        mag = np.abs(v)
        pos_edges = self.lo[G + 4 : 2 * G + 4]
        k = np.searchsorted(pos_edges, mag, side="right") - 1  # normal bin by magnitude, -1 below
        tiny, big = 2.0 ** -self.octaves, 2.0**self.octaves
        neg = np.signbit(v)
        out = np.where(mag >= big, np.where(neg, 0, 2 * G + 4),
                       np.where(mag >= tiny, np.where(neg, G - k, G + 4 + k),
                                np.where(neg, G + 1, np.where(mag > 0, G + 3, G + 2))))
        return out.astype(np.int64)
