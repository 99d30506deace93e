"""One forward pass per batch feeds every layer's statistics and exemplars."""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from probe.activations.exemplars import TopK
from probe.activations.grid import LogGrid
from probe.activations.rectified import Rectified, rectified_responses
from probe.activations.stats import LayerStats, PopulationStats, as_maps
from probe.hooks import Capture, model_device, resolve_layers
from probe.runtime import autocast, fast_model, to_device_batch

log = logging.getLogger(__name__)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, layers: Sequence[str] | None = None,
            device: torch.device | str | None = None, num_classes: int | None = None, grid: LogGrid | None = None,
            top_k: int = 8, hist_stride: int = 1, start: int = 0, amp: bool = False,
            rectified: dict[str, Rectified | None] | None = None) -> PopulationStats:
    """Population statistics and exemplars of ``layers`` over ``batches`` of ``(x (N, C, H, W), y (N,))``
    (a DataLoader, a list of pairs ...), each streamed through ``model`` once.

    ``layers``: module names (default :func:`probe.hooks.default_layers`: every conv, linear and pooling
    layer; an unknown name raises :class:`probe.errors.LayerNotFound` listing the valid ones). ``device``:
    default the model's. ``num_classes``: the number of labels (class means and selectivity are per label;
    default: the width of the model's output on the first image). ``grid``: the histogram grid (default
    :class:`LogGrid`), ``top_k`` exemplars per channel, ``hist_stride``: histogram every n-th position only.
    Returns the mergeable :class:`PopulationStats` (``stats.exemplars`` the :class:`TopK` per layer; see
    :mod:`probe.activations.stats` for the definitions). Memory does not grow with the number of images.

    Statistics are computed inside the forward hooks, before any following in-place ReLU.
    Image indices count from ``start`` in batch order. Nothing is copied to the host per batch.
    On CUDA (see :mod:`probe.runtime`): channels_last model and batches, non-blocking copies and, with
    ``amp``, the forward pass in bf16 autocast; every captured output is converted to float32 before
    it reaches the statistics (float64 sums), so only the layer outputs carry bf16 rounding.
    ``rectified``: each layer's rectified response (:mod:`probe.activations.rectified`); None: found by
    tracing the model on the first image of the first batch.
    """
    layers = resolve_layers(model, layers)
    device = model_device(model) if device is None else torch.device(device)
    model = fast_model(model, device)
    batches = iter(batches)
    first = next(batches, None)
    if num_classes is None:
        num_classes = 0 if first is None else int(model(to_device_batch(first[0][:1], device)).shape[-1])
    grid = grid or LogGrid()
    stats = PopulationStats({n: LayerStats(n, grid, num_classes, hist_stride) for n in layers},
                            {n: TopK(n, top_k) for n in layers})
    batch = {"y": None, "start": start}

    def record(name: str, out: torch.Tensor) -> None:
        stats[name].update(as_maps(name, out), batch["y"], stats.exemplars[name], batch["start"])

    if first is None:
        return stats
    if rectified is None:
        try:
            rectified = rectified_responses(model, to_device_batch(first[0][:1], device), layers)
        except Exception as e:  # a model the trace cannot follow: statistics still, dead / selectivity undefined
            log.warning("activations: could not trace the model to find its rectifiers (%s: %s); dead units and "
                        "class selectivity are left undefined", type(e).__name__, e)
            rectified = {}
    for n in layers:
        stats[n].rectified = rectified.get(n)
    with Capture(model, layers, fn=record), autocast(device, amp):
        for x, y in itertools.chain([first], batches):
            batch["y"] = to_device_batch(torch.as_tensor(y), device).long()
            model(to_device_batch(x, device))
            batch["start"] += len(x)
    return stats
