"""Transformation robustness with torch alone: pad, jitter, random scale, rotation and crops, and noise.

Every image of a batch draws its own random parameters from a seeded CPU generator (so CPU and
CUDA see the same draws). Jitter, scale, rotation and crops are affine maps, applied together with one
``grid_sample``; all of it is differentiable with respect to the image. ``copies`` transforms each image
several times per step (MACO's several crops per step); the renderer averages the objective over them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


class Pad:
    """Pad every side by ``pixels`` (``reflect``, ``replicate``, or ``constant`` grey 0.5)."""

    def __init__(self, pixels: int, mode: str = "reflect"):
        self.pixels, self.mode = int(pixels), mode

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.pixels <= 0:
            return x
        p = min(self.pixels, x.shape[-1] - 1, x.shape[-2] - 1) if self.mode == "reflect" else self.pixels
        if self.mode == "constant":
            return F.pad(x, (p,) * 4, mode="constant", value=0.5)
        return F.pad(x, (p,) * 4, mode=self.mode)


class Jitter:
    """Translate each image by its own whole number of pixels in ``[-pixels, pixels]`` (each axis)."""

    def __init__(self, pixels: int):
        self.pixels = int(pixels)

    def matrix(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        d = torch.randint(-self.pixels, self.pixels + 1, (n, 2), generator=gen).double()
        m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        m[:, 0, 2] = 2 * d[:, 0] / w  # normalised coordinates: one pixel is 2 / size
        m[:, 1, 2] = 2 * d[:, 1] / h
        return m

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return affine(x, self.matrix(x.shape[0], x.shape[2], x.shape[3], gen))


class RandomScale:
    """Zoom each image by its own factor drawn uniformly from ``[low, high]``."""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high)

    def matrix(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        s = _uniform(n, self.low, self.high, gen)
        m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        m[:, 0, 0] = m[:, 1, 1] = 1.0 / s  # sampling grid shrinks by s: content grows by s
        return m

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return affine(x, self.matrix(x.shape[0], x.shape[2], x.shape[3], gen))


class RandomRotate:
    """Rotate each image about its centre by its own angle drawn uniformly from ``[-degrees, degrees]``."""

    def __init__(self, degrees: float):
        self.degrees = float(degrees)

    def matrix(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        a = _uniform(n, -self.degrees, self.degrees, gen) * math.pi / 180
        c, s = a.cos(), a.sin()
        m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        # rotation in pixel space, expressed in normalised coordinates (non-square images stay undistorted)
        m[:, 0, 0], m[:, 0, 1] = c, -s * h / w
        m[:, 1, 0], m[:, 1, 1] = s * w / h, c
        return m

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return affine(x, self.matrix(x.shape[0], x.shape[2], x.shape[3], gen))


class RandomCrop:
    """MACO's random crops (Fel et al. 2023, section 3): a square box of side ``f`` times the image side,
    ``f`` drawn uniformly from ``[low, high]`` per image, at a uniformly drawn position inside the image,
    resized back to the full size. (MACO draws the box's side around a mean and its centre around the
    middle, on a canvas larger than the model's input; here the canvas is the input.)"""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high)

    def matrix(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        f = _uniform(n, self.low, self.high, gen)
        t = (1 - f)[:, None] * (2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1)
        m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        m[:, 0, 0] = m[:, 1, 1] = f  # the sampling grid covers the box: output -> input is x' = f x + t
        m[:, 0, 2], m[:, 1, 2] = t[:, 0], t[:, 1]
        return m

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return affine(x, self.matrix(x.shape[0], x.shape[2], x.shape[3], gen))


def add_noise(x: torch.Tensor, sd: float, gen: torch.Generator) -> torch.Tensor:
    """MACO's noise: Gaussian with standard deviation ``sd`` plus uniform on ``[-sd/2, sd/2]``, per pixel."""
    g = torch.randn(x.shape, generator=gen) * sd + (torch.rand(x.shape, generator=gen) - 0.5) * sd
    return x + g.to(device=x.device, dtype=x.dtype)


def affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` ``(N, C, H, W)`` through per-image affine maps ``m`` ``(N, 3, 3)`` (output -> input,
    normalised coordinates), bilinear, reflecting at the border."""
    theta = m[:, :2, :].to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, top:top + h, left:left + w]


class Transforms:
    """pad -> one affine map per image (jitter, scale, rotation, crop, each optional) -> centre crop back to
    the input size (``final="crop"``) or resize to ``out_size`` (``final="resize"``, as Lucent) -> noise.

    ``crop``: MACO's random box ``(low, high)`` as a fraction of the side (:class:`RandomCrop`; ``(1, 1)``:
    off); ``noise``: :func:`add_noise`'s standard deviation; ``copies``: transformed versions of each image
    per step (the renderer passes ``copies`` stacked batches and averages the objective over them).
    ``Transforms.off()`` is the identity.
    """

    def __init__(self, pad: int = 0, pad_mode: str = "reflect", jitter: int = 0,
                 scale: tuple[float, float] = (1.0, 1.0), rotate: float = 0.0,
                 final: str = "crop", out_size: int | None = None, crop: tuple[float, float] = (1.0, 1.0),
                 noise: float = 0.0, copies: int = 1):
        self.pad = Pad(pad, pad_mode)
        self.parts = []
        if jitter > 0:
            self.parts.append(Jitter(jitter))
        if tuple(scale) != (1.0, 1.0):
            self.parts.append(RandomScale(*scale))
        if rotate > 0:
            self.parts.append(RandomRotate(rotate))
        if tuple(crop) != (1.0, 1.0):
            self.parts.append(RandomCrop(*crop))
        self.final, self.out_size, self.noise, self.copies = final, out_size, float(noise), int(copies)
        self.active = pad > 0 or bool(self.parts) or out_size is not None or self.noise > 0 or self.copies > 1

    @classmethod
    def off(cls) -> "Transforms":
        return cls()

    @classmethod
    def from_fractions(cls, size: int, pad: float, pad_mode: str, jitter: float, scale, rotate: float,
                       crop=(1.0, 1.0), noise: float = 0.0, copies: int = 1) -> "Transforms":
        """Distances given as fractions of the image side ``size`` (so one setting fits 32 and 224 px)."""
        return cls(round(pad * size), pad_mode, round(jitter * size), tuple(scale), rotate, crop=tuple(crop),
                   noise=noise, copies=copies)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Transformed ``x`` ``(N, C, H, W)``, the same size as ``x`` (or ``out_size``)."""
        if not self.active:
            return x
        h, w = x.shape[2:]
        y = self.pad(x)
        if self.parts:
            n, hp, wp = y.shape[0], y.shape[2], y.shape[3]
            m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
            for part in self.parts:
                m = m @ part.matrix(n, hp, wp, gen)
            y = affine(y, m)
        if self.out_size is not None or self.final == "resize":
            size = self.out_size or h
            size = (size, size) if isinstance(size, int) else size
            if tuple(y.shape[2:]) != tuple(size):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        else:
            y = center_crop(y, h, w)
        return add_noise(y, self.noise, gen) if self.noise > 0 else y
