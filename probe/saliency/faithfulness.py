"""Deletion and insertion curves and their AUC (RISE protocol, Petsiuk et al. 2018), batched.

Pixels are taken in order of attribution, highest first, in ``steps`` equal steps (step k affects
the first ``floor(k * H * W / steps)`` pixels, all channels). Deletion replaces them with the
substrate; insertion starts from the substrate and puts the original pixels back. The model's score
is the softmax probability of the target class (softmax is applied to whatever the model returns:
for LeNet-5's log-probabilities, softmax(log_softmax(z)) = softmax(z)). AUC is the trapezoid rule
over the fraction of pixels in [0, 1]. A low deletion AUC and a high insertion AUC mean faithful.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from probe.saliency.batching import map_batches


def attribution_order(maps: torch.Tensor) -> torch.Tensor:
    """Pixel indices (N, H*W) sorted by attribution, highest first (ties: lower index first)."""
    return torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)


def random_order(n: int, pixels: int, seed: int) -> torch.Tensor:
    """A seeded random pixel order per image (N, H*W): the chance baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n, pixels, generator=g), dim=1)


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """rank[n, p] = position of pixel p in image n's order."""
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


@torch.no_grad()
def perturbation_curves(model: nn.Module, x: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                        substrate: torch.Tensor, steps: int, mode: str, batch_size: int = 512) -> torch.Tensor:
    """Target-class probability (N, steps + 1) as pixels are deleted (``mode='deletion'``) from ``x`` into
    ``substrate``, or inserted (``'insertion'``) from ``x`` into ``substrate``; both (N, C, H, W).

    All (image, step) pairs are evaluated in batches of ``batch_size`` perturbed images.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode: '{mode}' is not allowed; allowed: deletion, insertion")
    n, c, h, w = x.shape
    pixels = h * w
    ranks = _ranks(order.to(x.device)).view(n, 1, h, w)
    counts = torch.arange(steps + 1, device=x.device) * pixels // steps  # pixels affected at each step
    first, second = (substrate, x) if mode == "deletion" else (x, substrate)

    def score(lo: int, hi: int) -> torch.Tensor:
        flat = torch.arange(lo, hi, device=x.device)
        img, k = flat // (steps + 1), flat % (steps + 1)
        affected = ranks[img] < counts[k].view(-1, 1, 1, 1)  # (B, 1, H, W)
        xs = torch.where(affected, first[img], second[img])
        prob = torch.softmax(model(xs).float(), dim=1)
        return prob.gather(1, target[img].view(-1, 1).to(prob.device)).squeeze(1)

    return map_batches(score, n * (steps + 1), batch_size, what="deletion/insertion").view(n, steps + 1)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area (N,) under curves (N, steps + 1) sampled evenly on [0, 1]."""
    steps = curve.shape[1] - 1
    return (curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * steps)


def deletion_insertion_auc(model: nn.Module, x: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                           substrate: torch.Tensor, steps: int, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion AUC (N,), insertion AUC (N,)) for pixel ``order`` (N, H*W)."""
    d = perturbation_curves(model, x, target, order, substrate, steps, "deletion", batch_size)
    i = perturbation_curves(model, x, target, order, substrate, steps, "insertion", batch_size)
    return auc(d), auc(i)
