"""Where each layer's units sit in the input: stride, centre of unit 0 and theoretical receptive field."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from probe.models.summary import receptive_fields


@dataclass(frozen=True)
class LayerField:
    stride: tuple[float, float]  # input pixels between neighbouring units (y, x)
    centre0: tuple[float, float] | None  # input pixel at the centre of unit (0, 0); None: unknown
    trf: tuple[float, float] | None  # theoretical receptive field (h, w); None: unknown


def layer_fields(model: nn.Module, example: torch.Tensor, outputs: dict[str, torch.Tensor]) -> dict[str, LayerField]:
    """Fields of the layers in ``outputs`` (their outputs for ``example`` (1, C, H, W)), from the traced
    graph; where tracing fails, the stride is input size / map size and the rest unknown."""
    try:
        traced = receptive_fields(model, example)
    except Exception:  # a model fx cannot trace: fall back on the shapes
        traced = {}
    H, W = example.shape[-2:]
    out = {}
    for name, y in outputs.items():
        f = traced.get(name)
        if f is not None:
            out[name] = LayerField((f[0].j, f[1].j), (f[0].c, f[1].c), (f[0].r, f[1].r))
        elif y.dim() == 4:
            out[name] = LayerField((H / y.shape[-2], W / y.shape[-1]), None, None)
        else:
            out[name] = LayerField((float(H), float(W)), None, None)
    return out
