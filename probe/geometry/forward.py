"""Batched no-grad forward passes that keep the outputs of the hooked layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from probe.capture import Capture


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor, layers: list[str], batch_size: int = 128,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output ``(N, K)`` and each layer's output ``(N, ...)`` for images ``x`` ``(N, C, H, W)``, on the CPU."""
    outs: list[torch.Tensor] = []
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for i in range(0, len(x), batch_size):
        with Capture(model, layers) as cap:
            outs.append(model(x[i : i + batch_size].to(device)).float().cpu())
        for n in layers:
            if n in cap.outputs:
                acts[n].append(cap.outputs[n].float().cpu())
    return torch.cat(outs), {n: torch.cat(v) for n, v in acts.items() if v}


def module_types(model: nn.Module, layers: list[str]) -> dict[str, str]:
    modules = dict(model.named_modules())
    return {n: type(modules[n]).__name__ for n in layers}
