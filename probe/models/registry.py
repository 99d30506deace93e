"""Model registry: ``@register_model``, ``build(name, ...)``, ``list_models()``.

probe's own models are registered with the input they expect by default; every torchvision
classifier is available by its torchvision name (``resnet18``, ``vgg16``, ``googlenet`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torchvision


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    channels: int  # default input channels
    image_size: int  # default input height = width
    num_classes: int
    fixed_size: bool  # True when the architecture only accepts image_size (LeNet-5: 32)
    source: str  # "probe" or "torchvision"


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(channels: int = 1, image_size: int = 32, num_classes: int = 10, fixed_size: bool = False):
    """Register ``factory(in_channels, num_classes, **kwargs) -> nn.Module`` under its function name."""

    def wrap(factory):
        _REGISTRY[factory.__name__] = ModelSpec(
            factory.__name__, factory, channels, image_size, num_classes, fixed_size, "probe"
        )
        return factory

    return wrap


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models(filter: str = "") -> list[str]:
    """Names of every buildable model (probe's, then torchvision's), optionally containing ``filter``."""
    names = list(_REGISTRY) + [n for n in _torchvision_names() if n not in _REGISTRY]
    return [n for n in names if filter in n]


def spec(name: str) -> ModelSpec:
    from probe.errors import check_choice

    if name in _REGISTRY:
        return _REGISTRY[name]
    check_choice("model.name", name, list_models())
    size = 299 if name == "inception_v3" else 224
    return ModelSpec(name, None, 3, size, 1000, False, "torchvision")
