"""Effective receptive fields (Luo et al., 2016): the input gradient of a layer's central unit.

For a layer's map ``y`` ``(N, C, h, w)`` the central unit is ``(h // 2, w // 2)``; the ERF map is
``|d sum_c y[:, c, h//2, w//2] / dx|`` summed over input channels and averaged over images. Its
size is the side of the smallest square centred on the unit's centre (in input pixels) that holds
a share ``mass`` of the map, and the radius of the smallest such disc.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from probe.hooks import layer_outputs


def erf_maps(model: nn.Module, x: torch.Tensor, layers: list[str],
             device: torch.device | str = "cpu") -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """For every layer with a spatial map: (ERF map ``(H, W)``, central unit ``(uy, ux)``)."""
    x = x.to(device).requires_grad_(True)
    _, acts = layer_outputs(model, x, layers, output=False)
    names = [n for n in layers if n in acts and acts[n].dim() == 4]
    out = {}
    for i, n in enumerate(names):
        y = acts[n]
        uy, ux = y.shape[-2] // 2, y.shape[-1] // 2
        (g,) = torch.autograd.grad(y[:, :, uy, ux].sum(), x, retain_graph=i < len(names) - 1)
        out[n] = (g.abs().sum(1).mean(0).double().cpu().numpy(), (uy, ux))
    return out


def centre_of_mass(m: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
    total = m.sum()
    return float((m * yy).sum() / total), float((m * xx).sum() / total)


def erf_rms(m: np.ndarray, centre: tuple[float, float] | None = None) -> float:
    """Root-mean-square distance of the map's mass from ``centre`` (None: its centre of mass): the
    Gaussian-like spread that Luo et al. describe, without a mass threshold."""
    total = m.sum()
    if not np.isfinite(total) or total <= 0:
        return float("nan")
    cy, cx = centre if centre is not None else centre_of_mass(m)
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
    return float(np.sqrt((m * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / total))


def erf_size(m: np.ndarray, centre: tuple[float, float] | None = None, mass: float = 0.95) -> tuple[float, float]:
    """(side of the smallest centred square, radius of the smallest centred disc) holding ``mass`` of ``m``.

    ``centre`` is in pixel coordinates (row, column); None: the map's centre of mass.
    A square's side counts the pixels it spans (``2 d + 1`` for Chebyshev distance ``d``).
    """
    total = m.sum()
    if not np.isfinite(total) or total <= 0:
        return float("nan"), float("nan")
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
    cy, cx = centre if centre is not None else centre_of_mass(m)
    w = m.ravel()
    sizes = []
    for dist in (np.maximum(np.abs(yy - cy), np.abs(xx - cx)), np.hypot(yy - cy, xx - cx)):
        d = dist.ravel()
        order = np.argsort(d, kind="stable")
        cum = np.cumsum(w[order])
        k = int(np.searchsorted(cum, mass * total * (1 - 1e-9)))
        sizes.append(float(d[order][min(k, len(d) - 1)]))
    return 2 * sizes[0] + 1, sizes[1]
