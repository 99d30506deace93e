"""The class scores of a model whose ``forward`` returns more than them.

``output=1`` picks element 1 of a tuple or list, ``output="logits"`` the key of a dict (or the attribute of
an output object). :func:`select_output` does it with a forward hook on the model itself, so every consumer
(training loss, activation hooks, Captum, feature visualisation) sees the ``(N, classes)`` tensor while
every module keeps its own name; the hook survives ``copy.deepcopy`` and is not part of the state dict.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from probe.models.sources import ModelError

Selector = Union[int, str]


def describe(value) -> str:
    """What a forward pass returned, for messages: ``Tensor (2, 10) float32``, ``tuple of 2 (Tensor (2, 8, 4,
    4) float32, Tensor (2, 3) float32)``, ``dict with keys aux, logits``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} of {len(value)} ({inner})"
    if isinstance(value, dict):
        return f"dict with keys {', '.join(map(str, value))}"
    return type(value).__name__


def pick(value, output: Selector | None):
    """The element ``output`` of a forward pass's result (``value`` itself for ``None``). Raises :class:`ModelError`."""
    if output is None:
        return value
    if isinstance(value, torch.Tensor):
        raise ModelError("output", f"{output!r} picks from a tuple, list or dict, but the model returns {describe(value)}")
    if isinstance(value, (tuple, list)):
        if not isinstance(output, int) or not -len(value) <= output < len(value):
            raise ModelError("output", f"{output!r} does not index the model's {describe(value)}; "
                                       f"give 0..{len(value) - 1}")
        return value[output]
    if isinstance(value, dict):
        if output not in value:
            raise ModelError("output", f"{output!r} is not a key of the model's {describe(value)}")
        return value[output]
    if isinstance(output, str) and hasattr(value, output):
        return getattr(value, output)
    raise ModelError("output", f"{output!r} selects nothing in the model's {describe(value)}")


class OutputSelector:
    """Forward hook returning element ``output`` of the model's result. A tensor result passes unchanged:
    a forward that already selected (:func:`probe.models.head.logits_model`'s) is not selected twice."""

    def __init__(self, output: Selector):
        self.output = output

    def __call__(self, _module, _inputs, result):
        return None if isinstance(result, torch.Tensor) else pick(result, self.output)

    def __repr__(self) -> str:
        return f"OutputSelector({self.output!r})"


def select_output(model: nn.Module, output: Selector) -> nn.Module:
    """Make ``model(x)`` return ``pick(forward(x), output)``; returns ``model`` itself."""
    model.register_forward_hook(OutputSelector(output))
    return model


def selector(model: nn.Module) -> Selector | None:
    """The ``output`` a model was given by :func:`select_output`, or None."""
    return next((h.output for h in model._forward_hooks.values() if isinstance(h, OutputSelector)), None)


@torch.no_grad()
def check_classifier(model: nn.Module, x: torch.Tensor, output: Selector | None = None,
                     num_classes: int | None = None) -> torch.Tensor:
    """Check that ``model`` (eval mode) maps ``x`` (N, C, H, W) to class scores: a float tensor (N, classes)
    after ``output``, with ``num_classes`` columns when given. Returns the scores; raises :class:`ModelError`."""
    shape = "x".join(map(str, x.shape))
    try:
        raw = model(x)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError("input", f"the forward pass on zeros ({shape}) raised {type(e).__name__}: {text}") from None
    scores = pick(raw, output)
    if not isinstance(scores, torch.Tensor):
        hint = "; set output to the element holding the class scores" if output is None else ""
        raise ModelError("output", f"the model returns {describe(scores)}, not a tensor of class scores{hint}")
    if not scores.is_floating_point():
        raise ModelError("output", f"class scores must be floating point; the model returns {describe(scores)}")
    if scores.dim() != 2 or scores.shape[0] != x.shape[0]:
        raise ModelError("output", f"class scores must be ({x.shape[0]}, classes) for input {shape}; the model "
                                   f"returns {describe(scores)}")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ModelError("output", f"the model returns {scores.shape[1]} class scores ({describe(scores)}); "
                                   f"expected {num_classes}")
    return scores
