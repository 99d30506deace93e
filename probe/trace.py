"""One forward pass, recorded: which module and which rectifier or softmax produced which tensor.

probe needs to know a few facts about a network that its definition order does not tell: whether
a layer's output goes into a rectifier (dead units and class selectivity are defined there), which
tensor is the output of the last rectified convolutional block (Grad-CAM's layer), and whether the
model ends in a (log-)softmax (attributions and class images use the logit before it). Those
facts live in the forward pass, where a ReLU may be a module, reused, in place, or a functional
call, so :func:`trace_forward` records the pass itself: every module call (forward hooks) and every
rectifier and softmax call (a ``TorchFunctionMode``), in execution order.

A tensor is identified by ``(id, version)``: the object and torch's in-place version counter, so a
tensor changed in place in between (``out += identity`` before the block's ReLU) counts as a new value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Key = tuple[int, int]  # (id(tensor), tensor._version)

# rectifiers: max(x, 0) (ReLU6 too: it is max(x, 0) capped at 6). Leaky ReLU and PReLU are not: their
# output is negative where the input is, so "never > 0" means nothing there.
RECTIFIERS = {F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", torch.Tensor.relu: "relu",
              torch.Tensor.relu_: "relu", F.relu6: "relu6"}
SOFTMAXES = {F.softmax: "softmax", F.log_softmax: "log_softmax", torch.softmax: "softmax",
             torch.log_softmax: "log_softmax", torch.Tensor.softmax: "softmax", torch.Tensor.log_softmax: "log_softmax"}


def key(t: torch.Tensor) -> Key:
    return id(t), t._version


@dataclass
class Call:
    """A module call or a rectifier / softmax function call, in the order the calls returned."""

    kind: str  # "module" | "rectifier" | "softmax"
    name: str  # module name ("" is the model itself), or the function ("relu", "log_softmax")
    inputs: list[Key]  # the tensor positional inputs
    output: Key | None  # None when the output is not a tensor
    shape: tuple[int, ...] | None


@dataclass
class ForwardTrace:
    calls: list[Call] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list, repr=False)  # keeps every recorded tensor alive (ids unique)

    def module_calls(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "module"]

    def times_called(self) -> dict[str, int]:
        n: dict[str, int] = {}
        for c in self.module_calls():
            n[c.name] = n.get(c.name, 0) + 1
        return n

    def consumers(self, k: Key) -> list[Call]:
        """Every call that took the tensor value ``k`` as an input."""
        return [c for c in self.calls if k in c.inputs]

    def producers(self, k: Key) -> list[Call]:
        """Every module call whose output is the tensor value ``k`` (a module, its container, ...)."""
        return [c for c in self.module_calls() if c.output == k]


class _Functions(TorchFunctionMode):
    def __init__(self, trace: ForwardTrace):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = "rectifier" if func in RECTIFIERS else "softmax" if func in SOFTMAXES else None
        if kind is None:
            return func(*args, **kwargs)
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        before = [key(a) for a in inputs]  # before an in-place rectifier bumps the version
        out = func(*args, **kwargs)
        name = (RECTIFIERS if kind == "rectifier" else SOFTMAXES)[func]
        self.trace.keep.extend(inputs + [out])
        self.trace.calls.append(Call(kind, name, before, key(out), tuple(out.shape)))
        return out


@torch.no_grad()
def trace_forward(model: nn.Module, x: torch.Tensor) -> ForwardTrace:
    """Record one forward pass of ``model`` on ``x`` (N, C, H, W); one image is enough."""
    tr = ForwardTrace()

    pending: dict[str, list[list[Key]]] = {}  # inputs keyed at the call, before an in-place op inside changes them

    def pre(name):
        def fn(_m, inputs):
            ins = [a for a in inputs if isinstance(a, torch.Tensor)]
            tr.keep.extend(ins)
            pending.setdefault(name, []).append([key(a) for a in ins])
        return fn

    def post(name):
        def fn(_m, _inputs, output):
            is_tensor = isinstance(output, torch.Tensor)
            if is_tensor:
                tr.keep.append(output)
            tr.calls.append(Call("module", name, pending[name].pop(), key(output) if is_tensor else None,
                                 tuple(output.shape) if is_tensor else None))
        return fn

    handles = []
    for n, m in model.named_modules():
        handles += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    try:
        with _Functions(tr):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return tr
