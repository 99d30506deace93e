"""Reference images, in normalised space: black pixels, the dataset mean, or a blurred copy.

Used as Integrated Gradients and occlusion baselines and as the deletion / insertion substrate.
"""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(N, C, H, W)`` with ``sigma`` in pixels (kernel 2*ceil(3 sigma)+1, reflect padding,
    capped at the image size)."""
    k = 2 * int(torch.tensor(3.0 * sigma).ceil().item()) + 1
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma]) if k > 1 else x.clone()


def reference(kind: str, x: torch.Tensor, mean, std, blur_sigma: float) -> torch.Tensor:
    """Reference image for each image of ``x`` (N, C, H, W), normalised with per-channel ``mean`` / ``std``.

    zeros: black, i.e. pixel value 0, normalised ((0 - mean) / std); mean: the dataset's mean image,
    which is 0 once normalised; blur: ``x`` blurred with sigma ``blur_sigma`` (pixels).
    """
    if kind == "zeros":
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((0.0 - m) / s).expand_as(x).clone()
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "blur":
        return blur(x, blur_sigma)
    raise ValueError(f"unknown reference '{kind}'; allowed: zeros, mean, blur")
