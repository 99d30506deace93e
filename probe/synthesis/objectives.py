"""Batched, composable objectives (Lucent-style, but one value per image).

An objective maps ``(acts, image)`` to a tensor ``(N,)``: ``acts`` holds the captured outputs of
the layers it names (``objective.layers``; ``"logits"`` is the model's class scores) and ``image``
the pixels ``(N, C, H, W)`` in [0, 1] before transforms. Objectives are maximised and compose:
``channel("conv1", [0, 1, 2]) - 0.1 * tv()``, ``a + b``, ``2 * a``, ``-a``.

Per-unit objectives take one index per image (a list of length N) or one index for all: image
``i`` of a batch maximises unit ``units[i]``, gathered from a single forward pass.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LOGITS = "logits"  # the key under which the renderer puts the model's class scores

Acts = dict[str, torch.Tensor]


class Objective:
    """A function ``(acts, image) -> (N,)`` with the layers it needs and a readable name."""

    def __init__(self, fn: Callable[[Acts, torch.Tensor], torch.Tensor], layers: Sequence[str] = (), name: str = ""):
        self.fn, self.layers, self.name = fn, tuple(dict.fromkeys(layers)), name

    def __call__(self, acts: Acts, image: torch.Tensor) -> torch.Tensor:
        return self.fn(acts, image)

    def __add__(self, other) -> "Objective":
        if isinstance(other, (int, float)):
            return Objective(lambda a, x: self(a, x) + other, self.layers, f"({self.name} + {other})")
        return Objective(lambda a, x: self(a, x) + other(a, x), self.layers + other.layers, f"({self.name} + {other.name})")

    __radd__ = __add__

    def __mul__(self, k) -> "Objective":
        if not isinstance(k, (int, float)):
            raise TypeError(f"an objective can only be scaled by a number, not {type(k).__name__}")
        return Objective(lambda a, x: k * self(a, x), self.layers, f"{k} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return -1 * self

    def __sub__(self, other) -> "Objective":
        if isinstance(other, (int, float)):
            return self + (-other)
        return Objective(lambda a, x: self(a, x) - other(a, x), self.layers + other.layers, f"({self.name} - {other.name})")

    def __rsub__(self, other) -> "Objective":
        return (-self) + other

    def __truediv__(self, k) -> "Objective":
        return self * (1.0 / k)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _pick(t: torch.Tensor, units) -> torch.Tensor:
    """``t[i, units[i]]`` for every image ``i`` (``units`` an int: the same unit for all)."""
    if isinstance(units, int):
        return t[:, units]
    idx = torch.as_tensor(list(units), device=t.device, dtype=torch.long)
    if idx.numel() != t.shape[0]:
        raise ValueError(f"{idx.numel()} units given for a batch of {t.shape[0]} images")
    return t[torch.arange(t.shape[0], device=t.device), idx]


def channel(layer: str, channels, kind: str = "mean") -> Objective:
    """Channel ``channels[i]`` of ``layer`` for image ``i``: spatial mean, or the lecture's squared norm
    ``||h_{l,d}(x)||^2`` (sum of squares over positions) with ``kind="squared_norm"``. 2-D outputs
    ``(N, C)`` (linear layers) give the unit's value for ``mean`` and its square for ``squared_norm``."""
    if kind not in ("mean", "squared_norm"):
        raise ValueError(f"channel objective kind '{kind}': allowed mean, squared_norm")

    def fn(acts: Acts, _x):
        h = _pick(acts[layer], channels).reshape(acts[layer].shape[0], -1)  # (N, positions)
        return h.mean(1) if kind == "mean" else h.pow(2).sum(1)

    return Objective(fn, [layer], f"channel[{layer}]" if kind == "mean" else f"channel_sq[{layer}]")


def neuron(layer: str, channels, y: int | None = None, x: int | None = None) -> Objective:
    """Channel ``channels[i]`` of ``layer`` at one spatial position (default: the centre)."""

    def fn(acts: Acts, _x):
        h = _pick(acts[layer], channels)  # (N, H, W)
        yy = h.shape[1] // 2 if y is None else y
        xx = h.shape[2] // 2 if x is None else x
        return h[:, yy, xx]

    return Objective(fn, [layer], f"neuron[{layer}]")


def direction(layer: str, vectors) -> Objective:
    """The dot product of ``layer``'s activation vector at each position with ``vectors[i]`` (image ``i``;
    ``(N, C)``, or one ``(C,)`` for all), averaged over positions: Lucid's ``direction`` (its mean also
    divides by C, which does not change the maximiser)."""
    v = torch.as_tensor(vectors, dtype=torch.float32)

    def fn(acts: Acts, _x):
        h = acts[layer]
        vv = v.to(h.device, h.dtype)
        vv = vv.expand(h.shape[0], -1) if vv.dim() == 1 else vv
        if vv.shape != h.shape[:2]:
            raise ValueError(f"direction: vectors of shape {tuple(vv.shape)} for {layer} of shape {tuple(h.shape)}")
        return torch.einsum("nc...,nc->n...", h, vv).reshape(h.shape[0], -1).mean(1)

    return Objective(fn, [layer], f"direction[{layer}]")


def diversity(layer: str, group: int) -> Objective:
    """Lucid's diversity term (Olah et al. 2017, "Feature Visualization", Distill, section "Diversity"), a
    similarity to subtract: consecutive blocks of ``group`` images (the k images of one unit) are compared by
    the Gram matrices of their ``layer`` activations (channels x channels over positions), each scaled to unit
    Frobenius norm; image ``i`` gets ``sum_{j != i in its block} <G_i, G_j> / group``, so a block's values sum
    to Lucid's ``sum_i sum_{j != i} <G_i, G_j> / batch``. ``k`` identical images give ``(k - 1) / k`` each."""
    if group < 1:
        raise ValueError(f"diversity: group {group} must be >= 1")

    def fn(acts: Acts, _x):
        h = acts[layer]
        n, c = h.shape[:2]
        if n % group:
            raise ValueError(f"diversity: a batch of {n} images is not made of blocks of {group}")
        f = h.reshape(n, c, -1)
        g = torch.einsum("ncp,ndp->ncd", f, f).reshape(n, -1)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-10)
        g = g.reshape(n // group, group, -1)
        sim = torch.einsum("bid,bjd->bij", g, g)
        off = sim.sum(2) - torch.diagonal(sim, dim1=1, dim2=2)
        return (off / group).reshape(n)

    return Objective(fn, [layer], f"diversity[{layer}]")


def class_logit(classes) -> Objective:
    """The class score (pre-softmax logit) of class ``classes[i]`` for image ``i``."""
    return Objective(lambda a, _x: _pick(a[LOGITS], classes), [LOGITS], "class_logit")


def class_log_prob(classes) -> Objective:
    """``log softmax(logits)[classes[i]]``: the class's log-probability."""
    return Objective(lambda a, _x: _pick(F.log_softmax(a[LOGITS], dim=1), classes), [LOGITS], "class_log_prob")


def deep_dream(layer: str) -> Objective:
    """The L2 norm of ``layer``'s whole activation, per image (Deep Dream)."""
    return Objective(lambda a, _x: a[layer].flatten(1).norm(dim=1), [layer], f"dream[{layer}]")


def l1(constant: float = 0.5) -> Objective:
    """Mean ``|x - constant|`` over the pixels of each image (a penalty: subtract it)."""
    return Objective(lambda _a, x: (x - constant).abs().flatten(1).mean(1), [], "l1")


def l2(constant: float = 0.5) -> Objective:
    """Mean ``(x - constant)^2`` over the pixels of each image (a penalty: subtract it)."""
    return Objective(lambda _a, x: (x - constant).pow(2).flatten(1).mean(1), [], "l2")


def distance_to(reference: torch.Tensor) -> Objective:
    """Mean ``(x - reference)^2`` over the pixels of each image, ``reference`` ``(N, C, H, W)`` in [0, 1] (a
    penalty: feature accentuation's pull towards its seed image, :func:`probe.synthesis.accentuate.accentuate`)."""
    ref = reference.detach()
    return Objective(lambda _a, x: (x - ref.to(x.device, x.dtype)).pow(2).flatten(1).mean(1), [], "distance_to_seed")


def gaussian_prior(basis) -> Objective:
    """Mean squared whitened coefficient of each image on the principal components of the training images
    (:class:`probe.synthesis.param.PixelBasis`): half the negative log-density, per component, of the image's
    projection under the images' Gaussian model (a penalty: subtract it; 1 is typical of a training image)."""
    return Objective(lambda _a, x: basis.whiten(x).pow(2).mean(1), [], "gaussian_prior")


def total_variation() -> Objective:
    """Mean absolute difference between vertical neighbours plus that between horizontal ones."""

    def fn(_a, x):
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
        return dy + dx

    return Objective(fn, [], "tv")


def blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur ``[1 2 1] x [1 2 1] / 16`` of each channel, edges replicated. ``(N, C, H, W)``."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k2 = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=x.shape[1])


def blur_penalty() -> Objective:
    """Mean ``(x - blur(x))^2`` with ``blur(x)`` held constant: Lucid's blur penalty."""
    return Objective(lambda _a, x: (x - blur3(x).detach()).pow(2).flatten(1).mean(1), [], "blur")


def regularisers(l1_w: float = 0.0, l2_w: float = 0.0, tv_w: float = 0.0, blur_w: float = 0.0) -> Objective | None:
    """The weighted sum of the penalties with a non-zero weight (to subtract), or None."""
    terms = [w * f() for w, f in ((l1_w, l1), (l2_w, l2), (tv_w, total_variation), (blur_w, blur_penalty)) if w]
    return sum(terms[1:], terms[0]) if terms else None
