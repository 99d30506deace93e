"""Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading from the output down.

Layers with parameters of their own are re-initialised one at a time (their ``reset_parameters``
under a fixed seed, on a deep copy), from the last executed to the first, each step keeping the
layers randomised before it. After each step the same method runs on the same images and targets,
and its map is compared with the original: Spearman rank correlation of absolute values, and SSIM
of the absolute maps min-max normalised to [0, 1]. A map that depends on what the model learned
should decorrelate as layers are randomised; an edge detector stays put.

The rank correlation is also computed on the *informative* pixels only: the pixels where the
original or the randomised map is non-zero (``|a| > 0 or |b| > 0``). Pixels that are exactly 0 in
both maps tie at the bottom of both rankings and inflate the correlation whatever the model
learned: Integrated Gradients with a black baseline gives exactly 0 wherever the image is black,
for any weights (its attribution is (x - x') times an averaged gradient). Adebayo et al. 2018
(model randomization test, their similarity metrics: Spearman rank correlation of absolute
values, SSIM) rank |maps| over all pixels: that figure is kept as ``spearman``.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn as nn

from probe.images import minmax
from probe.saliency.ssim import ssim


@torch.no_grad()
def cascade_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of modules with their own parameters and ``reset_parameters``, last executed first."""
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if hasattr(mod, "reset_parameters") and any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_hook(
                lambda _m, _i, _o, name=name: order.append(name) if name not in order else None))
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order[::-1]


def cascading_randomisations(model: nn.Module, layers: list[str], seed: int) -> Iterator[tuple[int, str, nn.Module]]:
    """Yield (step, layer, model) with layers[:step] re-initialised on one deep copy (step 1 = top layer).

    Each layer is reset under ``seed + step`` inside a forked RNG, so the global RNG is untouched.
    """
    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    for step, name in enumerate(layers, start=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + step)
            modules[name].reset_parameters()
        yield step, name, m


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based, float64) of each row of ``v`` (N, M), ties given their average rank."""
    s, idx = v.sort(dim=1, stable=True)
    n, m = s.shape
    pos = torch.arange(m, device=v.device).expand(n, m)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    last = torch.where(ends, pos, torch.full_like(pos, m - 1)).flip(1).cummin(1).values.flip(1)
    r = (first + last).double() / 2 + 1
    return torch.empty_like(r).scatter_(1, idx, r)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation (N,) between rows of ``a`` and ``b`` (N, ...); NaN where a map is constant."""
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def informative(original: torch.Tensor, randomised: torch.Tensor) -> torch.Tensor:
    """(N, H*W) mask of the informative pixels: non-zero in the original or in the randomised map."""
    return (original.flatten(1) != 0) | (randomised.flatten(1) != 0)


def spearman_informative(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Spearman rank correlation (N,) of the rows of ``a`` and ``b`` restricted to each row's informative pixels
    (:func:`informative`), the number of those pixels (N,)). NaN where fewer than 2 pixels are informative or
    either map is constant on them."""
    mask = informative(a, b)
    af, bf = a.flatten(1), b.flatten(1)
    rho = torch.full((len(af),), float("nan"), dtype=torch.float64)
    for n in range(len(af)):
        keep = mask[n]
        if int(keep.sum()) >= 2:
            rho[n] = spearman(af[n, keep][None], bf[n, keep][None])[0].double()
    return rho, mask.sum(1)


def compare_maps(original: torch.Tensor, randomised: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per map row, for maps (N, H, W): ``spearman`` of |maps| over all pixels, ``spearman_informative`` over the
    informative pixels, ``informative_pixels`` (their number) and ``ssim`` of min-max normalised |maps|."""
    a, b = original.abs(), randomised.abs()
    rho_i, count = spearman_informative(a, b)
    return {"spearman": spearman(a, b), "spearman_informative": rho_i, "informative_pixels": count,
            "ssim": ssim(minmax(a.double(), (1, 2), eps=1e-12), minmax(b.double(), (1, 2), eps=1e-12))}
