"""Feature accentuation (Hamblin et al. 2024, "Feature Accentuation: Revealing 'What' Features Respond to in
Natural Images"): start the optimisation at a real image and keep it close, so the result shows what in that
image drives a unit, instead of an image of the unit from nothing.

The objective is ``objective(x) - weight * mean((x - seed)^2)`` (:func:`probe.synthesis.objectives.distance_to`),
from ``x = seed`` in the chosen parametrisation. ``weight = inf`` returns the seeds unchanged (the penalty's
minimiser), ``weight = 0`` is free optimisation from the seed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from probe.synthesis import objectives as O
from probe.synthesis.objectives import LOGITS, Objective
from probe.synthesis.param import ImageParam
from probe.models.head import scores_model
from probe.synthesis.render import Normalize, RenderResult, forward_capture, frozen, render
from probe.synthesis.transform import Transforms


def accentuate(model: nn.Module, objective: Objective, seeds: torch.Tensor, *, weight: float, steps: int,
               lr: float = 0.05, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), kind: str = "fourier",
               color: torch.Tensor | None = None, transforms: Transforms | None = None, seed: int = 0,
               labels: Sequence[str] | None = None, on_nan: str = "error") -> RenderResult:
    """Accentuate ``seeds`` ``(N, C, H, W)`` in [0, 1] (image ``i`` for the unit ``objective`` gives it) for
    ``steps`` Adam steps of ``objective - weight * distance_to(seeds)``; ``kind``: ``"fourier"`` or ``"pixel"``
    (the image starts as the seed, clamped into ``(0.001, 0.999)`` for the sigmoid). Returns :func:`render`'s
    result, whose ``objective`` is the unit's objective alone (without the penalty)."""
    if weight < 0:
        raise ValueError(f"accentuate: weight {weight} must be >= 0")
    if kind not in ("fourier", "pixel"):
        raise ValueError(f"accentuate: parametrisation '{kind}': allowed fourier, pixel (maco fixes the magnitude "
                         "and so cannot start at a given image)")
    n, c, h, w = seeds.shape
    device = next(model.parameters()).device
    if math.isinf(weight):
        pixels = seeds.detach().float().to(device)
        with torch.no_grad(), frozen(model):
            x = Normalize(mean, std).to(device)(pixels)
            acts = forward_capture(scores_model(model, x) if LOGITS in objective.layers else model, x, objective.layers)
            value = objective(acts, pixels)
        return RenderResult(pixels.cpu(), value.cpu(), {k: v.cpu() for k, v in acts.items()},
                            torch.full((n,), -1, dtype=torch.long), torch.zeros_like(pixels).cpu())
    param = ImageParam(n, c, (h, w), kind=kind, color=color, device=device).set_pixels(seeds)
    total = objective - weight * O.distance_to(seeds.to(device)) if weight else objective
    res = render(model, total, param, steps=steps, lr=lr, mean=mean, std=std, transforms=transforms, seed=seed,
                 labels=labels, on_nan=on_nan)
    res.objective = objective(res.acts, res.pixels)  # the unit's objective alone, on the final images
    return res
