"""The class scores of a model: the logits before a final (log-)softmax.

Attributions (Simonyan et al. 2014, section 3; Selvaraju et al. 2017, section 3: "the score for
class c, before the softmax") and class-model images (Simonyan et al. 2014, section 2: "the
unnormalised class scores") are defined on the pre-softmax score. Differentiating a
log-probability instead is not only a different quantity (it subtracts every other class's
evidence): in float32, when p rounds to 1 the target's own term is lost. LeNet-5 as in the
lecture ends in ``LogSoftmax``; a torchvision classifier ends in logits.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn

from probe.models.output import pick, selector
from probe.trace import ForwardTrace, _Functions, key, trace_forward


def softmax_head(trace: ForwardTrace) -> str | None:
    """The softmax function ("softmax" / "log_softmax") that produced the model's output in ``trace``, or None."""
    out = next((c.output for c in reversed(trace.module_calls()) if c.name == ""), None)
    hit = next((c for c in trace.calls if c.kind == "softmax" and c.output == out), None)
    return None if hit is None else hit.name


def _logits_forward(self, *args, **kwargs):
    """The class's own forward, returning the input of the (log-)softmax that produced its output (the
    selected element of it, for a model given an ``output`` by :func:`probe.models.output.select_output`)."""
    tr = ForwardTrace()
    with _Functions(tr):
        out = pick(type(self).forward(self, *args, **kwargs), selector(self))
    if not isinstance(out, torch.Tensor):
        return out
    hit = next((c for c in reversed(tr.calls) if c.kind == "softmax" and c.output == key(out)), None)
    if hit is None:
        return out
    return next(t for t in tr.keep if key(t) == hit.inputs[0])


def logits_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` that returns the logits its final (log-)softmax takes (the model itself, copied,
    when it ends in scores already). Module names and parameters are those of ``model``, so hooks and Captum
    layers by name work on the copy; only its ``forward`` changes (and survives ``copy.deepcopy``).
    ``example``: an input batch (N, C, H, W), to trace the head.
    """
    m = copy.deepcopy(model)
    if softmax_head(trace_forward(m, example[:1])) is not None:
        m.forward = types.MethodType(_logits_forward, m)
    return m


def scores_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself when it returns class scores, else :func:`probe.models.head.logits_model`'s copy
    that returns the logits its final (log-)softmax takes (same module names, so hooks by name work).

    Class-model images maximise the unnormalised class score (Simonyan et al. 2014, section 2); the
    head is found from the forward pass (:func:`probe.models.head.softmax_head`), so a softmax that is a
    module, a functional call or a method all count. ``example``: an input batch ``(N, C, H, W)``.
    """
    with torch.no_grad():
        if softmax_head(trace_forward(model, example[:1])) is None:
            return model
    return logits_model(model, example[:1])
