"""probe's model zoo: ``@register_model`` records a factory with the input it expects by default.

Every torchvision classifier is buildable by its torchvision name too (``resnet18``, ``vgg16``,
``googlenet`` ...); :mod:`probe.models.sources` resolves names of every kind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Optional[Callable[..., nn.Module]]  # probe's zoo only: factory(in_channels, num_classes, **kwargs)
    channels: int  # default input channels
    image_size: int  # default input height = width
    num_classes: Optional[int]  # default number of class scores (None: unknown, your own callables)
    fixed_size: bool  # True when the architecture only accepts image_size (LeNet-5: 32)
    source: str  # "probe", "torchvision", "timm", "entry_point" or "import" (see probe.models.sources)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(channels: int = 1, image_size: int = 32, num_classes: int = 10, fixed_size: bool = False):
    """Register ``factory(in_channels, num_classes, **kwargs) -> nn.Module`` under its function name."""

    def wrap(factory):
        _REGISTRY[factory.__name__] = ModelSpec(
            factory.__name__, factory, channels, image_size, num_classes, fixed_size, "probe"
        )
        return factory

    return wrap


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classifier's name, sorted."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))
