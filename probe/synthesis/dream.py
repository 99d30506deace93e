"""Deep Dream: amplify what a layer already sees in an image, at several octaves, with jitter;
and the zoom-and-repeat variant (dream, zoom in, dream again on the result).

Normalised gradient steps as the original Deep Dream, but on each pixel's log-odds ``logit(x)`` rather than on
``x`` clipped to [0, 1]: a pixel slows as it nears 0 or 1 instead of piling up there, so the dream does not
saturate the image (clipped steps turned most of a digit's pixels pure black or white).
Only the layers up to the dream layer run, so any image size that layer accepts works, even on
fixed-size models such as LeNet-5.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from probe.errors import ConfigError, NumericalError
from probe.synthesis.objectives import deep_dream
from probe.synthesis.render import Normalize, forward_capture, frozen


EPS = 1e-3  # pixels are kept this far from 0 and 1, where the log-odds are infinite


def roll_per_image(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Circularly shift image ``i`` of ``x`` ``(N, C, H, W)`` by ``(dy[i], dx[i])`` pixels."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] - dy.to(x.device)[:, None]) % h  # (N, H)
    cols = (torch.arange(w, device=x.device)[None, :] - dx.to(x.device)[:, None]) % w  # (N, W)
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def dream_steps(model: nn.Module, x: torch.Tensor, layer: str, norm: Normalize, steps: int, lr: float, jitter: int,
                gen: torch.Generator, where: str = "") -> torch.Tensor:
    """``steps`` normalised gradient-ascent steps on the L2 norm of ``layer``, each image jittered on its own;
    the steps are taken on ``logit(x)`` (``x`` kept in ``[EPS, 1 - EPS]``), ``lr`` in log-odds units."""
    objective = deep_dream(layer)
    n = x.shape[0]
    for step in range(steps):
        dy = torch.randint(-jitter, jitter + 1, (n,), generator=gen)
        dx = torch.randint(-jitter, jitter + 1, (n,), generator=gen)
        xs = roll_per_image(x, dy, dx).detach().requires_grad_(True)
        try:
            obj = objective(forward_capture(model, norm(xs), [layer]), xs)
        except RuntimeError as e:
            raise ConfigError(f"layer: '{layer}' cannot run on {tuple(x.shape[2:])} images ({e}); "
                              f"use fewer octaves or a smaller octave_scale") from None
        if not torch.isfinite(obj).all():
            i = int((~torch.isfinite(obj)).nonzero()[0])
            raise NumericalError(f"deep dream: objective is {float(obj[i])} for layer {layer}, image {i}{where} at step {step}")
        (g,) = torch.autograd.grad(obj.sum(), xs)
        g = roll_per_image(g, -dy, -dx) * x * (1 - x)  # the gradient with respect to logit(x)
        g = g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = torch.sigmoid(torch.logit(x.clamp(EPS, 1 - EPS)) + lr * g).detach()
    return x


def deep_dream_octaves(model: nn.Module, pixels: torch.Tensor, layer: str, *, mean: Sequence[float],
                       std: Sequence[float], octaves: int = 3, octave_scale: float = 1.4, steps: int = 12,
                       lr: float = 0.015, jitter: int = 2, seed: int = 0) -> torch.Tensor:
    """Deep Dream of ``pixels`` ``(N, C, H, W)`` in [0, 1]: smallest octave first, the detail added at
    each octave carried up to the next; returns ``(N, C, H, W)`` in [0, 1]."""
    norm = Normalize(mean, std).to(pixels.device)
    gen = torch.Generator().manual_seed(int(seed))
    h, w = pixels.shape[2:]
    sizes = [(max(1, round(h / octave_scale ** k)), max(1, round(w / octave_scale ** k))) for k in reversed(range(octaves))]
    detail = torch.zeros_like(_resize(pixels, sizes[0]))
    with frozen(model):
        for o, size in enumerate(sizes):
            base = _resize(pixels, size)
            x = (base + _resize(detail, size)).clamp(0, 1)
            x = dream_steps(model, x, layer, norm, steps, lr, jitter, gen, where=f", octave {o}")
            detail = x - base
    return x


def zoom_in(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Crop the central ``1/factor`` of each image and resize it back to full size."""
    h, w = x.shape[2:]
    ch, cw = max(1, round(h / factor)), max(1, round(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(x[:, :, top:top + ch, left:left + cw], (h, w))


def zoom_frames(model: nn.Module, pixels: torch.Tensor, layer: str, *, mean: Sequence[float], std: Sequence[float],
                frames: int = 4, zoom: float = 1.1, steps: int = 8, lr: float = 0.015, jitter: int = 2,
                seed: int = 0) -> torch.Tensor:
    """The lecture's zoom-and-repeat: ``x_{t+1} = dream(zoom(x_t))``; returns the frames ``(frames, N, C, H, W)``."""
    norm = Normalize(mean, std).to(pixels.device)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    out, x = [], pixels
    with frozen(model):
        for f in range(frames):
            x = dream_steps(model, zoom_in(x, zoom), layer, norm, steps, lr, jitter, gen, where=f", zoom frame {f}")
            out.append(x)
    return torch.stack(out)
