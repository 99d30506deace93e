"""Image parametrisations: what the optimiser changes, and how it becomes pixels.

``ImageParam(...)()`` gives pixels ``(N, C, H, W)`` in [0, 1]: parameters (pixels; a Fourier
spectrum scaled by 1/frequency, as Lucid; or MACO's phase with a fixed magnitude) -> colour
decorrelation (the square root of the colour covariance of the model's own training pixels) -> sigmoid.
The renderer then normalises with the run's mean/std. Every image of a batch gets its own seed, so a
batch starts exactly where the same images rendered one at a time would.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def fft_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """``1 / max(f, 1/max(h, w)) ** decay_power`` for the rfft2 frequencies of an ``h x w`` image: ``(h, w//2+1)``."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    f = (fx * fx + fy * fy).sqrt()
    return 1.0 / f.clamp_min(1.0 / max(h, w)) ** decay_power


def maco_magnitude(pixels: torch.Tensor, color: torch.Tensor | None = None) -> torch.Tensor:
    """MACO's fixed magnitude spectrum (Fel et al. 2023, "Unlocking feature visualization for deeper networks
    with MAgnitude Constrained Optimization", section 3): the mean over ``pixels`` ``(N, C, H, W)`` in [0, 1]
    (the run's own training images) of ``|fft2|`` of each image in decorrelated colour space (``color``'s
    inverse applied to the image minus its mean), per channel. The mean (DC) term is set to 0, and the whole
    is scaled so that an image with this magnitude has unit standard deviation over its pixels and channels,
    which is what MACO's standardisation of each image gives: ``(C, H, W)``, symmetric under ``k -> -k``.
    """
    n, c, h, w = pixels.shape
    x = pixels.double() - pixels.double().mean((2, 3), keepdim=True)
    if color is not None:
        x = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(torch.as_tensor(color, dtype=torch.float64)), x)
    mag = torch.fft.fft2(x, norm="ortho").abs().mean(0)
    mag[:, 0, 0] = 0.0
    return (mag * (c * h * w / mag.pow(2).sum().clamp_min(1e-30)).sqrt()).float()


def sigmoid_moments(gain: float, offset: float, sd: float, points: int = 64) -> tuple[float, float]:
    """Mean and standard deviation of ``sigmoid(gain * z + offset)`` for ``z ~ N(0, sd^2)`` (Gauss-Hermite)."""
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(points)
    w = w / w.sum()
    y = 1 / (1 + np.exp(-(gain * sd * z + offset)))
    m = float((w * y).sum())
    return m, float(np.sqrt(max((w * (y - m) ** 2).sum(), 0.0)))


def value_map(pixels: torch.Tensor, sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the ``gain`` and ``offset`` for which ``sigmoid(gain * z + offset)`` with ``z ~ N(0, sd_c^2)``
    has the mean and standard deviation of channel ``c`` of ``pixels`` ``(N, C, H, W)`` in [0, 1]: so that a
    MACO image, whose values before the sigmoid have a fixed spread ``sd``, has the brightness and contrast of the
    run's own images (MACO's sigmoid of a standardised image assumes ImageNet-like ones). Moments matched by
    least squares; the contrast is capped at what a sigmoid can give."""
    from scipy.optimize import least_squares

    gains, offsets = [], []
    for c in range(pixels.shape[1]):
        x = pixels[:, c].double()
        m, s = float(x.mean()), float(x.std())
        m = min(max(m, 0.02), 0.98)

        def residual(p):
            mm, ss = sigmoid_moments(p[0], p[1], float(sd[c]))
            return [mm - m, ss - s]

        fit = least_squares(residual, x0=[1.0, float(torch.logit(torch.tensor(m)))], bounds=([0.05, -10], [20, 10]))
        gains.append(fit.x[0])
        offsets.append(fit.x[1])
    return torch.tensor(gains, dtype=torch.float32), torch.tensor(offsets, dtype=torch.float32)


@dataclass
class PixelBasis:
    """The principal components of a set of images: ``mean`` ``(D,)``, orthonormal ``components`` ``(k, D)``
    and their standard deviations ``sd`` ``(k,)``, for images of ``shape`` ``(C, H, W)`` (``D = C * H * W``)."""

    mean: torch.Tensor
    components: torch.Tensor
    sd: torch.Tensor
    shape: tuple[int, int, int]

    def whiten(self, pixels: torch.Tensor) -> torch.Tensor:
        """The coefficients of ``pixels`` ``(N, C, H, W)`` on the components, divided by their sd: ``(N, k)``
        (under the images' Gaussian model, independent with unit variance)."""
        x = pixels.reshape(len(pixels), -1) - self.mean.to(pixels.device, pixels.dtype)
        return (x @ self.components.to(pixels.device, pixels.dtype).T) / self.sd.to(pixels.device, pixels.dtype)


def pca_basis(pixels: torch.Tensor, k: int | None = None, variance: float | None = None) -> PixelBasis:
    """The principal components of ``pixels`` ``(N, C, H, W)`` (SVD of the centred images in float64): the first
    ``k``, or the fewest that explain ``variance`` (a share) of the images' total variance."""
    n = len(pixels)
    flat = pixels.reshape(n, -1).double()
    mean = flat.mean(0)
    _, s, vt = torch.linalg.svd(flat - mean, full_matrices=False)
    sd = s / max(n - 1, 1) ** 0.5
    if (k is None) == (variance is None):
        raise ValueError("pca_basis: give k or variance")
    if k is None:
        share = sd.pow(2).cumsum(0) / sd.pow(2).sum().clamp_min(1e-30)
        k = int((share < variance).sum()) + 1
    k = max(1, min(int(k), len(sd)))
    return PixelBasis(mean.float(), vt[:k].float(), sd[:k].clamp_min(1e-12).float(), tuple(pixels.shape[1:]))


def training_images(dataset: Dataset, mean: Sequence[float], std: Sequence[float], size: tuple[int, int],
                    limit: int = 2000, batch_size: int = 256) -> torch.Tensor:
    """Up to ``limit`` images of ``dataset`` (normalised with ``mean``/``std``) as pixels in [0, 1], resized to
    ``size`` when they are another size."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    chunks, n = [], 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = (x[: limit - n] * s + m).clamp(0, 1)
        if tuple(x.shape[2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        chunks.append(x)
        n += x.shape[0]
        if n >= limit:
            break
    return torch.cat(chunks)


def antisymmetric(t: torch.Tensor) -> torch.Tensor:
    """``(t(k) - t(-k)) / 2`` over the last two axes (frequencies modulo the size): a phase that is odd
    under ``k -> -k``, so a spectrum ``m * exp(i * phase)`` with a symmetric ``m`` is Hermitian (a real image)."""
    flipped = torch.roll(torch.flip(t, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return (t - flipped) / 2


class ImageParam(torch.nn.Module):
    """A batch of ``n`` images ``(C, H, W)``, one seed per image, as one of four parametrisations (``kind``):

    - ``"pixel"``: the values before the sigmoid;
    - ``"fourier"``: Lucid's spectrum scaled by 1/frequency;
    - ``"maco"``: MACO's phase with a fixed magnitude (``magnitude``, :func:`maco_magnitude`);
    - ``"pca"``: coefficients on the principal components of the run's own training images (``basis``,
      :func:`pca_basis`), each in units of its standard deviation: the image is ``mean + sum_j z_j sd_j v_j``,
      clamped to [0, 1], so it stays in the span of the data (no colour matrix or sigmoid).

    ``color``: a ``(C, C)`` decorrelation matrix (None: identity); ``gain`` / ``offset`` ``(C,)``: the map before
    the sigmoid, ``sigmoid(gain * x + offset)`` (:func:`value_map`; default 1 and 0).

    MACO optimises only the phase of the image's spectrum; its magnitude stays the template's, exactly:
    the parameters are a real array per image, made odd under ``k -> -k`` (:func:`antisymmetric`), so the
    spectrum ``magnitude * exp(i * phase)`` is Hermitian and its inverse FFT is a real image whose spectrum
    has that magnitude (MACO's own code drops the imaginary part of a half-spectrum instead). MACO's per-step
    standardisation of the image is implied: the template fixes the image's mean (0) and energy (1 per value).
    Unlike MACO, the phase is not standardised at every step (it is an angle; shifting it by its mean changes
    the image).
    """

    KINDS = ("pixel", "fourier", "maco", "pca")

    def __init__(self, n: int, channels: int, size: int | tuple[int, int], kind: str = "fourier",
                 color: torch.Tensor | None = None, decay_power: float = 1.0, init_sd: float = 0.01,
                 seeds: Sequence[int] | None = None, magnitude: torch.Tensor | None = None,
                 basis: PixelBasis | None = None, gain: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else size
        if kind not in self.KINDS:
            raise ValueError(f"image parametrisation '{kind}': allowed {', '.join(self.KINDS)}")
        self.n, self.c, self.h, self.w, self.kind = n, channels, h, w, kind
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        if kind == "maco" and (magnitude is None or tuple(magnitude.shape) != (channels, h, w)):
            got = None if magnitude is None else tuple(magnitude.shape)
            raise ValueError(f"maco parametrisation needs a magnitude of shape {(channels, h, w)}, got {got}")
        if kind == "pca" and (basis is None or tuple(basis.shape) != (channels, h, w)):
            got = None if basis is None else tuple(basis.shape)
            raise ValueError(f"pca parametrisation needs a basis of images of shape {(channels, h, w)}, got {got}")
        shape = {"pixel": (channels, h, w), "fourier": (channels, h, w // 2 + 1, 2), "maco": (channels, h, w),
                 "pca": (len(basis.sd),) if basis is not None else ()}[kind]
        init = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        self.params = torch.nn.Parameter((init * (1.0 if kind == "maco" else init_sd)).to(device))
        color = torch.eye(channels) if color is None else torch.as_tensor(color, dtype=torch.float32)
        self.register_buffer("color", color.to(device))
        self.register_buffer("scale", fft_scale(h, w, decay_power).to(device))
        gain = torch.ones(channels) if gain is None else torch.as_tensor(gain, dtype=torch.float32)
        offset = torch.zeros(channels) if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        self.register_buffer("gain", gain.view(1, -1, 1, 1).to(device))
        self.register_buffer("offset", offset.view(1, -1, 1, 1).to(device))
        if kind == "maco":
            self.register_buffer("magnitude", torch.as_tensor(magnitude, dtype=torch.float32).to(device))
        if kind == "pca":
            self.register_buffer("basis_mean", basis.mean.to(device))
            self.register_buffer("basis_scaled", (basis.components * basis.sd[:, None]).to(device))

    def linear(self) -> torch.Tensor:
        """The image before colour mixing and sigmoid: ``(N, C, H, W)``, roughly zero-centred (for ``pca``: the
        image itself, before clamping)."""
        if self.kind == "pixel":
            return self.params
        if self.kind == "maco":  # the spectrum is Hermitian: its inverse is irfft2 of the non-negative x frequencies
            half = self.w // 2 + 1
            phase = antisymmetric(self.params)[..., :half]
            spectrum = torch.polar(self.magnitude[..., :half].expand_as(phase), phase)
            return torch.fft.irfft2(spectrum, s=(self.h, self.w), norm="ortho")
        if self.kind == "pca":
            return (self.basis_mean + self.params @ self.basis_scaled).view(-1, self.c, self.h, self.w)
        spectrum = torch.view_as_complex(self.params) * self.scale
        return torch.fft.irfft2(spectrum, s=(self.h, self.w), norm="ortho") / FOURIER_GAIN

    def forward(self) -> torch.Tensor:
        """Pixels ``(N, C, H, W)`` in [0, 1]."""
        if self.kind == "pca":
            return self.linear().clamp(0, 1)
        x = torch.einsum("dc,nchw->ndhw", self.color, self.linear())
        return torch.sigmoid(self.gain * x + self.offset)

    @torch.no_grad()
    def set_pixels(self, pixels: torch.Tensor, eps: float = 1e-3) -> "ImageParam":
        """Make the parameters represent ``pixels`` ``(N, C, H, W)`` (clamped into ``(eps, 1-eps)``)."""
        p = pixels.to(self.params.device).clamp(eps, 1 - eps)
        if self.kind == "pca":  # the projection on the components (exact for images in their span)
            self.params.copy_(((p.reshape(len(p), -1) - self.basis_mean) @ self.basis_scaled.T)
                              / self.basis_scaled.pow(2).sum(1))
            return self
        lin = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(self.color), (torch.logit(p) - self.offset) / self.gain)
        self.params.copy_(self.linear_to_params(lin))
        return self

    def linear_to_params(self, lin: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`linear`: the parameters that give ``lin`` ``(N, C, H, W)`` (for MACO, the phase of
        ``lin``'s spectrum: the image keeps the template's magnitude, so only its phase can be matched)."""
        if self.kind == "pixel":
            return lin
        if self.kind == "maco":
            return torch.angle(torch.fft.fft2(lin, norm="ortho"))
        spectrum = torch.fft.rfft2(lin * FOURIER_GAIN, norm="ortho") / self.scale
        return torch.view_as_real(spectrum).contiguous()
