"""Image parametrisations: what the optimiser changes, and how it becomes pixels.

``ImageParam(...)()`` gives pixels ``(N, C, H, W)`` in [0, 1]: parameters (pixels or a Fourier
spectrum scaled by 1/frequency, as Lucid) -> colour decorrelation (the square root of the colour
covariance of the model's own training pixels) -> sigmoid. The renderer then normalises with the
run's mean/std. Every image of a batch gets its own seed, so a batch starts exactly where the same
images rendered one at a time would.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

FOURIER_GAIN = 4.0  # Lucid's "magic" divisor: keeps the initial image away from saturation


def color_sqrt(pixels: torch.Tensor) -> torch.Tensor:
    """The square root (via SVD) of the colour covariance of ``pixels`` ``(N, C, H, W)`` in [0, 1],
    scaled, as Lucid's constant, so that its largest column has norm 1. Identity for one channel.

    Returns ``(C, C)`` with ``M @ M.T`` proportional to the covariance.
    """
    c = pixels.shape[1]
    if c == 1:
        return torch.ones(1, 1)
    flat = pixels.transpose(0, 1).reshape(c, -1).double()
    cov = torch.cov(flat)
    u, s, _ = torch.linalg.svd(cov)
    m = u * s.clamp_min(0).sqrt()[None, :]
    return (m / m.norm(dim=0).max().clamp_min(1e-12)).float()


def color_sqrt_from_data(dataset: Dataset, mean: Sequence[float], std: Sequence[float], channels: int,
                         limit: int = 2000, batch_size: int = 256) -> torch.Tensor:
    """:func:`color_sqrt` of up to ``limit`` training images (denormalised with ``mean``/``std``)."""
    if channels == 1:
        return torch.ones(1, 1)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    chunks, n = [], 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        chunks.append(x[: limit - n] * s + m)
        n += chunks[-1].shape[0]
        if n >= limit:
            break
    return color_sqrt(torch.cat(chunks))


def fft_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """``1 / max(f, 1/max(h, w)) ** decay_power`` for the rfft2 frequencies of an ``h x w`` image: ``(h, w//2+1)``."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    f = (fx * fx + fy * fy).sqrt()
    return 1.0 / f.clamp_min(1.0 / max(h, w)) ** decay_power


class ImageParam(torch.nn.Module):
    """A batch of ``n`` images ``(C, H, W)`` as pixels or Fourier coefficients, one seed per image.

    ``kind``: ``"pixel"`` or ``"fourier"``; ``color``: a ``(C, C)`` decorrelation matrix (None: identity).
    """

    def __init__(self, n: int, channels: int, size: int | tuple[int, int], kind: str = "fourier",
                 color: torch.Tensor | None = None, decay_power: float = 1.0, init_sd: float = 0.01,
                 seeds: Sequence[int] | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else size
        self.n, self.c, self.h, self.w, self.kind = n, channels, h, w, kind
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        shape = (channels, h, w) if kind == "pixel" else (channels, h, w // 2 + 1, 2)
        init = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        self.params = torch.nn.Parameter((init * init_sd).to(device))
        color = torch.eye(channels) if color is None else torch.as_tensor(color, dtype=torch.float32)
        self.register_buffer("color", color.to(device))
        self.register_buffer("scale", fft_scale(h, w, decay_power).to(device))

    def linear(self) -> torch.Tensor:
        """The image before colour mixing and sigmoid: ``(N, C, H, W)``, roughly zero-centred."""
        if self.kind == "pixel":
            return self.params
        spectrum = torch.view_as_complex(self.params) * self.scale
        return torch.fft.irfft2(spectrum, s=(self.h, self.w), norm="ortho") / FOURIER_GAIN

    def forward(self) -> torch.Tensor:
        """Pixels ``(N, C, H, W)`` in [0, 1]."""
        x = torch.einsum("dc,nchw->ndhw", self.color, self.linear())
        return torch.sigmoid(x)

    @torch.no_grad()
    def set_pixels(self, pixels: torch.Tensor, eps: float = 1e-3) -> "ImageParam":
        """Make the parameters represent ``pixels`` ``(N, C, H, W)`` (clamped into ``(eps, 1-eps)``)."""
        p = pixels.to(self.params.device).clamp(eps, 1 - eps)
        lin = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(self.color), torch.logit(p))
        self.params.copy_(self.linear_to_params(lin))
        return self

    def linear_to_params(self, lin: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`linear`: the parameters that give ``lin`` ``(N, C, H, W)``."""
        if self.kind == "pixel":
            return lin
        spectrum = torch.fft.rfft2(lin * FOURIER_GAIN, norm="ortho") / self.scale
        return torch.view_as_real(spectrum).contiguous()
