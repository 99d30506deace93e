"""Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading from the output down.

Layers with parameters of their own are re-initialised one at a time (their ``reset_parameters``
under a fixed seed, on a deep copy), from the last executed to the first, each step keeping the
layers randomised before it. After each step the same method runs on the same images and targets,
and its map is compared with the original: Spearman rank correlation of absolute values, and SSIM
of the absolute maps min-max normalised to [0, 1]. A map that depends on what the model learned
should decorrelate as layers are randomised; an edge detector stays put.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn as nn

from probe.saliency.ssim import minmax, ssim


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


def compare_maps(original: torch.Tensor, randomised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Spearman of |maps|, SSIM of min-max normalised |maps|), each (N,), for maps (N, H, W)."""
    a, b = original.abs(), randomised.abs()
    return spearman(a, b), ssim(minmax(a.double()), minmax(b.double()))
