"""A copy of a model that attribution hooks can use safely, and the layer Grad-CAM reads by default.

torchvision ResNets and VGGs use ``ReLU(inplace=True)``, and ResNet's BasicBlock calls one ReLU
module twice. Captum's guided backprop hooks the tensors going into and out of each ReLU call
(a forward pre-hook clones the input), which copes with reuse; an in-place ReLU would still
overwrite the output of the layer before it, which Grad-CAM keeps. So every method runs on a
deep copy with every ReLU out of place and parameters frozen (input gradients only).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from probe.capture import resolve_layers
from probe.errors import ConfigError


def attribution_copy(model: nn.Module) -> nn.Module:
    """Deep copy in eval mode, every ``nn.ReLU`` out of place, parameters not requiring gradients."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@torch.no_grad()
def conv_output_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Spatial output size (h, w) of every Conv2d for an input like ``x`` (one image is run)."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:]))))
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return sizes


def gradcam_layer(model: nn.Module, x: torch.Tensor, name: str | None) -> str:
    """``name`` checked against the model, or the last Conv2d (in execution order) with an output larger
    than 1x1: LeNet-5's last conv outputs 1x1, where Grad-CAM is one constant over the image."""
    if name is not None:
        resolve_layers(model, [name], key="saliency.gradcam_layer")
        return name
    sizes = conv_output_sizes(model, x)
    if not sizes:
        raise ConfigError("saliency.gradcam_layer: the model has no Conv2d layer; name a layer (or drop grad_cam "
                          "from saliency.methods)")
    larger = [n for n, (h, w) in sizes.items() if h * w > 1]
    return (larger or list(sizes))[-1]
