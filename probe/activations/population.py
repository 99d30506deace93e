"""One forward pass per batch feeds every layer's statistics and exemplars."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from probe.activations.exemplars import TopK
from probe.activations.grid import LogGrid
from probe.activations.stats import LayerStats, PopulationStats, as_maps
from probe.capture import Capture


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, layers: list[str], device: torch.device, num_classes: int,
            grid: LogGrid | None = None, top_k: int = 8, hist_stride: int = 1,
            start: int = 0) -> tuple[PopulationStats, dict[str, TopK]]:
    """Stream ``batches`` of ``(x (N, C, H, W), y (N,))`` through ``model`` once each.

    Statistics are computed inside the forward hooks, before any following in-place ReLU.
    Image indices count from ``start`` in batch order. Nothing is copied to the host per batch.
    """
    grid = grid or LogGrid()
    stats = PopulationStats({n: LayerStats(n, grid, num_classes, hist_stride) for n in layers})
    tops = {n: TopK(n, top_k) for n in layers}
    batch = {"y": None, "start": start}

    def record(name: str, out: torch.Tensor) -> None:
        summary = stats[name].update(as_maps(name, out), batch["y"])
        tops[name].update(summary, batch["start"])

    with Capture(model, layers, fn=record):
        for x, y in batches:
            batch["y"] = torch.as_tensor(y).to(device, non_blocking=True).long()
            model(x.to(device, non_blocking=True))
            batch["start"] += len(x)
    return stats, tops
