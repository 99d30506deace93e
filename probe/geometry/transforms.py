"""Image transforms in pixel space: shifts (circular or zero-filled), rotations, scalings.

Images are normalised ``(N, C, H, W)``; ``fill`` is the normalised value of a black pixel
(``-mean / std`` per channel, shape ``(1, C, 1, 1)``, or a float), so "zero-filled" means black
comes in, not the normalised value 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AXIS_DIM = {"y": -2, "x": -1}


def shift(x: torch.Tensor, n: int, dim: int, mode: str, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Move the content of ``x`` by ``n`` positions along ``dim`` (positive: towards higher indices).

    ``mode="circular"`` wraps around (``torch.roll``); ``mode="zero"`` lets ``fill`` come in.
    """
    if mode == "circular":
        return torch.roll(x, n, dims=dim)
    length = x.shape[dim]
    out = torch.empty_like(x)
    out.copy_(torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand_as(x))
    if abs(n) >= length:
        return out
    if n >= 0:
        out.narrow(dim, n, length - n).copy_(x.narrow(dim, 0, length - n))
    else:
        out.narrow(dim, 0, length + n).copy_(x.narrow(dim, -n, length + n))
    return out


def overlap(ft: torch.Tensor, f0: torch.Tensor, k: int, dim: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of ``f(Tx)`` and of ``f(x)`` that should agree when ``T`` moves maps by ``k`` along ``dim``.

    Circular: all of ``f(Tx)`` against ``roll(f(x), k)``. Zero-filled: the positions of ``f(Tx)``
    that came from ``f(x)`` (the ``|k|`` filled rows are left out); empty when ``|k|`` >= the map size.
    """
    if mode == "circular":
        return ft, torch.roll(f0, k, dims=dim)
    length = ft.shape[dim]
    keep = max(length - abs(k), 0)
    if k >= 0:
        return ft.narrow(dim, k if keep else 0, keep), f0.narrow(dim, 0, keep)
    return ft.narrow(dim, 0, keep), f0.narrow(dim, -k if keep else 0, keep)


def affine(x: torch.Tensor, degrees: float = 0.0, scale: float = 1.0, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Rotate by ``degrees`` (counter-clockwise) and zoom by ``scale`` about the image centre, bilinear,
    with ``fill`` coming in from outside. Square images assumed (our models' inputs)."""
    a = math.radians(degrees)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return F.grid_sample(x - fill_t, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill_t
