"""Layers of a model: which ones to look at, and their outputs in one forward pass.

Layer selection (each rule defined here once): :func:`default_layers` (every conv, linear and pooling
layer: what statistics and geometry analyse), :func:`conv_layers`, :func:`first_conv`,
:func:`middle_conv`, :func:`spaced_convs`, all by module name in definition order.

Forward probes: :class:`Capture` hooks layers for the duration of a ``with`` block;
:func:`layer_outputs` runs a model once and returns the outputs of the layers asked for;
:func:`batched_layer_outputs` does it batch by batch without gradients.

Hooks run inside the forward pass, so a statistic computed in ``fn`` sees a module's output
before a following ``ReLU(inplace=True)`` overwrites it (torchvision ResNet ``bn1``, VGG
``features.0``). Kept outputs are cloned for the same reason. Hooks are removed on exit, even
when the forward pass raises.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from probe.errors import LayerNotFound, closest

DEFAULT_LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


# -- which layers -------------------------------------------------------------------------------------
def default_layers(model: nn.Module) -> list[str]:
    """Every conv, linear and pooling layer, in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, DEFAULT_LAYER_TYPES)]


def conv_layers(model: nn.Module) -> list[str]:
    """Every ``nn.Conv2d``, in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def first_conv(model: nn.Module) -> str | None:
    """The first ``nn.Conv2d`` in definition order (the one whose kernels live in input space), or None."""
    convs = conv_layers(model)
    return convs[0] if convs else None


def middle_conv(model: nn.Module) -> str | None:
    """The middle ``nn.Conv2d``: ``convs[(n - 1) // 2]`` of the ``n`` convs (the earlier of two middles), or None."""
    convs = conv_layers(model)
    return convs[(len(convs) - 1) // 2] if convs else None


def spaced_convs(model: nn.Module, most: int = 20, count: int = 3) -> list[str]:
    """Every ``nn.Conv2d``; for models with more than ``most``, ``count`` evenly spaced ones (early to late):
    conv ``round((i + 1) n / (count + 1))`` for ``i < count``."""
    convs = conv_layers(model)
    if len(convs) <= most:
        return convs
    return [convs[round((i + 1) * len(convs) / (count + 1))] for i in range(count)]


def check_layers(model: nn.Module, names: Sequence[str], key: str = "layers") -> list[str]:
    """``names`` as a list, after checking that ``model`` has each one; raises :class:`LayerNotFound` naming
    ``key`` (the caller's name for the argument), the closest valid name and the valid ones."""
    valid = [n for n, _ in model.named_modules() if n]
    known = set(valid)
    for n in names:
        if n not in known:
            shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
            raise LayerNotFound(f"{key}: layer '{n}' does not exist{closest(n, valid)}; valid layers: {shown}")
    return list(names)


def resolve_layers(model: nn.Module, names: Sequence[str] | None, key: str = "layers") -> list[str]:
    """``names`` checked against the model (:func:`check_layers`); ``None`` or empty: :func:`default_layers`."""
    if not names:
        return default_layers(model)
    return check_layers(model, names, key)


def module_types(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Layer name -> its module's class name (``"Conv2d"``)."""
    modules = dict(model.named_modules())
    return {n: type(modules[n]).__name__ for n in layers}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# -- forward probes -----------------------------------------------------------------------------------
class Capture:
    """Hook ``layers`` of ``model``; call ``fn(name, output)`` in the hook, or keep clones in ``outputs``.

    Only tensor outputs are seen; a layer called several times keeps its last output. ``detach``: outputs
    without autograd history (``False``: gradients flow through them to the input).

    >>> with Capture(model, ["conv1", "fc"]) as cap:
    ...     model(x)
    >>> cap.outputs["conv1"].shape  # (N, C, H, W)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], fn: Callable[[str, torch.Tensor], None] | None = None,
                 detach: bool = True):
        self.model, self.layers, self.fn, self.detach = model, check_layers(model, layers), fn, detach
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


class _Enough(Exception):
    """Raised in a hook once every requested layer is captured: the rest of the forward pass is skipped."""


def layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[str], *,
                  output: bool = True) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Run ``model`` once on ``x`` ``(N, C, H, W)``: ``(its output, {layer: that layer's output})``.

    The outputs are clones taken inside the hooks (before any in-place ReLU that follows) and keep their
    autograd history when gradients are enabled, so ``torch.autograd.grad(acts[name].sum(), x)`` works.
    With ``output=False`` the model's output is not needed: the pass stops as soon as every layer is
    captured and ``None`` comes back in its place. Layers whose output is not a tensor, or that the pass
    does not reach, are missing from the dict.
    """
    names = list(dict.fromkeys(layers))
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str, out: torch.Tensor) -> None:
        acts[name] = out.clone()
        if not output and len(acts) == len(names):
            raise _Enough

    out = None
    with Capture(model, names, fn=keep, detach=False):
        try:
            out = model(x)
        except _Enough:
            pass
    return (out if output else None), acts


@torch.no_grad()
def batched_layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[str], batch_size: int = 128,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`layer_outputs` of ``x`` ``(N, C, H, W)`` in batches of ``batch_size`` moved to ``device``, without
    gradients: the model's output ``(N, ...)`` and each layer's output ``(N, ...)``, float32, on the CPU."""
    outs: list[torch.Tensor] = []
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for i in range(0, len(x), batch_size):
        out, got = layer_outputs(model, x[i : i + batch_size].to(device), layers)
        outs.append(out.float().cpu())
        for n, v in got.items():
            acts[n].append(v.float().cpu())
    return torch.cat(outs), {n: torch.cat(v) for n, v in acts.items() if v}
