"""Image helpers used by every picture probe draws: min-max scaling and laying tiles out in a grid."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def minmax(a: np.ndarray | torch.Tensor, axes: int | Sequence[int] | None = None, eps: float = 0.0):
    """``(a - min) / (max - min)`` over ``axes`` (``None``: all of ``a``), so each slice spans [0, 1].

    A slice whose span is ``<= eps`` (a constant map) becomes zeros: no division by ~0. Works on numpy
    arrays and torch tensors alike, in their own dtype. E.g. maps ``(N, H, W)`` with ``axes=(1, 2)``:
    each map scaled on its own.
    """
    if isinstance(a, torch.Tensor):
        dims = tuple(range(a.dim())) if axes is None else axes
        lo, hi = a.amin(dims, keepdim=True), a.amax(dims, keepdim=True)
        span = hi - lo
        return torch.where(span > eps, (a - lo) / span.clamp_min(eps), torch.zeros_like(a))
    lo, hi = a.min(axes, keepdims=True), a.max(axes, keepdims=True)
    span = hi - lo
    scaled = (a - lo) / np.where(span > eps, span, 1)
    return scaled if eps == 0 else np.where(span > eps, scaled, np.zeros_like(scaled))


def rows_of(items: Sequence, cols: int) -> list[list]:
    """``items`` cut into rows of ``cols`` (the last row may be shorter)."""
    return [list(items[i : i + cols]) for i in range(0, len(items), cols)]


def tile_grid(rows: Sequence[Sequence[np.ndarray]], gap: int, fill: float | int, dtype=None) -> np.ndarray:
    """Tiles of one size ``(h, w)`` or ``(h, w, c)`` laid out row by row, ``gap`` pixels between and around
    them, on a background of ``fill``: ``(R (h + gap) + gap, K (w + gap) + gap[, c])`` for ``R`` rows of at
    most ``K`` tiles, tile ``(i, j)`` at ``(gap + i (h + gap), gap + j (w + gap))``. ``dtype``: the tiles'
    by default."""
    first = np.asarray(rows[0][0])
    h, w = first.shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) + gap, ncol * (w + gap) + gap) + first.shape[2:], fill,
                     dtype=dtype or first.dtype)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            canvas[y : y + h, x : x + w] = t
    return canvas
