"""Context-managed forward hooks: one forward pass, many layers.

Hooks run inside the forward pass, so a statistic computed in ``fn`` sees a module's output
before a following ``ReLU(inplace=True)`` overwrites it (torchvision ResNet ``bn1``, VGG
``features.0``). Kept outputs are cloned for the same reason. Hooks are removed on exit, even
when the forward pass raises.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from probe.errors import closest
from probe.errors import ConfigError

DEFAULT_LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def default_layers(model: nn.Module) -> list[str]:
    """Every conv, linear and pooling layer, in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, DEFAULT_LAYER_TYPES)]


def resolve_layers(model: nn.Module, names: list[str] | None, key: str = "layers") -> list[str]:
    """Check layer names against the model (``None`` or ``[]``: the defaults), naming the closest valid one."""
    if not names:
        return default_layers(model)
    valid = [n for n, _ in model.named_modules() if n]
    for n in names:
        if n not in valid:
            shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
            raise ConfigError(f"{key}: layer '{n}' does not exist{closest(n, valid)}; valid layers: {shown}")
    return list(names)


class Capture:
    """Hook ``layers`` of ``model``; call ``fn(name, output)`` in the hook, or keep clones in ``outputs``.

    >>> with Capture(model, ["conv1", "fc"]) as cap:
    ...     model(x)
    >>> cap.outputs["conv1"].shape  # (N, C, H, W)
    """

    def __init__(self, model: nn.Module, layers: list[str], fn: Callable[[str, torch.Tensor], None] | None = None,
                 detach: bool = True):
        self.model, self.layers, self.fn, self.detach = model, resolve_layers(model, layers), fn, detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "Capture":
        modules = dict(self.model.named_modules())
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            if self.fn is not None:
                self.fn(name, output.detach() if self.detach else output)
            else:
                self.outputs[name] = output.detach().clone() if self.detach else output.clone()

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
