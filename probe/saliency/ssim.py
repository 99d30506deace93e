"""Structural similarity (Wang et al. 2004) of batches of 2-D maps, in torch.

Gaussian window (11 x 11, sigma 1.5; 7 x 7 for maps smaller than 11, smaller still when needed),
K1 = 0.01, K2 = 0.03, population (co)variances, mean over the valid window positions (no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_window(size: int, sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """(size, size) normalised gaussian weights."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def window_size(h: int, w: int) -> int:
    side = min(h, w)
    if side >= 11:
        return 11
    if side >= 7:
        return 7
    return side if side % 2 else side - 1


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int | None = None,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (N,) between maps ``a`` and ``b`` (N, H, W), computed in float64."""
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"ssim: maps must both be (N, H, W); got {tuple(a.shape)} and {tuple(b.shape)}")
    size = window or window_size(*a.shape[-2:])
    if size < 1:
        raise ValueError(f"ssim: maps of {tuple(a.shape[-2:])} are too small")
    k = gaussian_window(size, sigma, device=a.device).view(1, 1, size, size)
    x, y = a.double().unsqueeze(1), b.double().unsqueeze(1)
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    var_x = F.conv2d(x * x, k) - mu_x ** 2
    var_y = F.conv2d(y * y, k) - mu_y ** 2
    cov = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
