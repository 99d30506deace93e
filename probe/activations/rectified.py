"""Which layers have a *rectified response*, and what it is: where dead units and class selectivity are defined.

A unit is dead when it never fires, and Morcos et al.'s class selectivity index (2018, "On the importance
of single directions for generalization", section 2.3) compares class-conditional mean activities of a
unit that is silent at 0: both are statements about a rectifier (``max(x, 0)``). So for each analysed layer
``L`` we look, in one recorded forward pass (:func:`probe.trace.trace_forward`), for the rectifier its
output feeds:

- ``"relu"`` / ``"relu6"``: ``L``'s output value goes straight into a ReLU (module, functional, in place or
  not; ReLU6 caps at 6): the rectified response is ``max(x, 0)`` (``min(max(x, 0), 6)``).
- ``"bn+relu"`` / ``"bn+relu6"``: it goes through an eval-mode BatchNorm into the rectifier (conv -> bn ->
  relu, every ResNet): ``max(a_c (x - m_c) + beta_c, 0)`` with the BN's ``a_c = gamma_c / sqrt(running_var_c
  + eps)`` and ``m_c`` its running mean, channel by channel (``a_c x + b_c`` with ``b_c = beta_c - m_c a_c``,
  written the BN's way so that float32 keeps its digits when ``|m_c a_c|`` is large).
- ``"self"``: ``L``'s output *is* a rectifier's output (an ``nn.ReLU``, or a block whose last op is one):
  the output itself.
- ``None`` otherwise: a pooling layer after a ReLU, a conv whose output is added to a shortcut before the
  ReLU, a BN in training mode in between, a leaky ReLU / PReLU / GELU (negative outputs: "never > 0"
  means nothing there), the logits. Dead and selectivity are undefined there.

A value is the same value only while nothing changes it in place (tensors are keyed by object and
version), so ``out += identity; relu(out)`` is not a ReLU of ``bn2``'s output. A module called several
times has a rectified response only if every call has the same one. Not recognised (so ``None``):
``torch.clamp(x, min=0)`` and ``F.hardtanh(x, 0, t)`` written as functions, functional batch norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

from probe.trace import Call, ForwardTrace, trace_forward

KINDS = ("relu", "relu6", "bn+relu", "bn+relu6", "self")
_CAPS = {"relu": math.inf, "relu6": 6.0}
_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"))  # ReLU6 is a Hardtanh: its function call is not traced


@dataclass(frozen=True)
class Rectified:
    """A layer's rectified response ``clamp(scale * (x - center) + offset, 0, cap)`` per channel.

    ``scale``/``center``/``offset`` are ``(C,)`` float64 for ``"bn+relu*"`` (the BN's gamma / sqrt(var + eps),
    running mean and beta; ``via``: its name), ``None`` (1, 0 and 0) otherwise; ``cap`` is ``inf`` except for ReLU6.
    ``sites``: the positions in the traced pass of the rectifier calls whose units these are (a conv, its BN and
    their ReLU name the same units: pooled counts take each site once)."""

    kind: str
    scale: np.ndarray | None = None
    center: np.ndarray | None = None
    offset: np.ndarray | None = None
    cap: float = math.inf
    via: str | None = None
    sites: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rectified: kind '{self.kind}' is not one of {', '.join(KINDS)}")

    def affine(self, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scale, center, offset)`` as float64 ``(channels,)`` arrays (1, 0 and 0 when there is no BN)."""
        if self.scale is None:
            return np.ones(channels), np.zeros(channels), np.zeros(channels)
        if len(self.scale) != channels:
            raise ValueError(f"rectified: {self.via} has {len(self.scale)} channels, the layer {channels}")
        return self.scale, self.center, self.offset

    def same(self, other: "Rectified | None") -> bool:
        """The same response (kind, cap, BN and its affine map; ``sites`` aside)."""
        if other is None or (self.kind, self.cap, self.via) != (other.kind, other.cap, other.via):
            return False
        if self.scale is None or other.scale is None:
            return self.scale is None and other.scale is None
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("scale", "center", "offset"))

    def dead(self, mn: np.ndarray, mx: np.ndarray) -> np.ndarray:
        """Per channel: the rectified response is never > 0, from the exact min and max of ``x``.

        ``a (x - m) + b`` is monotone in ``x``: its max over the population is at ``max`` for ``a > 0``, at
        ``min`` for ``a < 0`` and ``b`` for ``a = 0``; the response is never > 0 iff that is <= 0 (the cap
        does not matter). A channel with a NaN is not called dead."""
        a, m, b = self.affine(len(mx))
        mn, mx = mn.astype(np.float64), mx.astype(np.float64)
        with np.errstate(invalid="ignore"):
            top = np.where(a > 0, a * (mx - m) + b, np.where(a < 0, a * (mn - m) + b, b))
        return top <= 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The rectified response of ``x`` ``(N, C, ...)`` in float64 (for tests and small tensors)."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a, m, b = (torch.as_tensor(v, dtype=torch.float64, device=x.device).view(shape) for v in self.affine(x.shape[1]))
        return ((x.double() - m) * a + b).clamp(0, self.cap)

    def state(self) -> dict[str, np.ndarray]:
        out = {"kind": np.array(self.kind), "cap": np.array(self.cap, dtype=np.float64), "via": np.array(self.via or ""),
               "sites": np.array(self.sites, dtype=np.int64)}
        if self.scale is not None:
            out.update({f: np.asarray(getattr(self, f), np.float64) for f in ("scale", "center", "offset")})
        return out

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "Rectified":
        return cls(str(state["kind"]), state.get("scale"), state.get("center"), state.get("offset"),
                   float(state["cap"]), str(state["via"]) or None,
                   tuple(int(i) for i in state["sites"]) if "sites" in state else ())


def _rectifier_of(call: Call, modules: dict[str, nn.Module]) -> str | None:
    """``"relu"``/``"relu6"`` when ``call`` applies a rectifier to its first input, else None."""
    if call.kind == "rectifier":
        return call.name
    if call.kind == "module":
        m = modules.get(call.name)
        for cls, name in _MODULES:
            if isinstance(m, cls):
                return name
    return None


def _eval_batchnorm(m: nn.Module | None) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_mean is not None
            and m.running_var is not None)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gamma / sqrt(running_var + eps), running_mean, beta)`` in float64 (what eval-mode BN computes)."""
    mean, var = bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu()
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros_like(mean)
    return (gamma / torch.sqrt(var + bn.eps)).numpy(), mean.numpy(), beta.numpy()


def _site(tr: ForwardTrace, k) -> int:
    """The rectifier call that produced the value ``k``: the first call whose output it is (the function
    call inside an ``nn.ReLU`` returns before the module does)."""
    return next(i for i, c in enumerate(tr.calls) if c.output == k)


def _of_value(tr: ForwardTrace, k, modules: dict[str, nn.Module]) -> Rectified | None:
    """The rectified response of the tensor value ``k``."""
    if any(c.kind == "rectifier" and c.output == k for c in tr.calls) or any(
            _rectifier_of(c, modules) and c.output == k for c in tr.module_calls()):
        return Rectified("self", sites=(_site(tr, k),))
    found: list[Rectified] = []
    for c in tr.consumers(k):
        r = _rectifier_of(c, modules)
        if r is not None and c.inputs[:1] == [k]:
            found.append(Rectified(r, cap=_CAPS[r], sites=(_site(tr, c.output),)))
        elif c.kind == "module" and c.inputs[:1] == [k] and _eval_batchnorm(modules.get(c.name)) and c.output is not None:
            for d in tr.consumers(c.output):
                r = _rectifier_of(d, modules)
                if r is not None and d.inputs[:1] == [c.output]:
                    found.append(Rectified(f"bn+{r}", *_bn_affine(modules[c.name]), cap=_CAPS[r], via=c.name,
                                           sites=(_site(tr, d.output),)))
    # a direct rectifier first; several different ones (relu and relu6, two BNs): undefined
    direct = [f for f in found if f.scale is None]
    pick = direct if direct else found
    if pick and all(pick[0].same(f) for f in pick[1:]):
        return pick[0]
    return None


def rectified_of_trace(tr: ForwardTrace, model: nn.Module, layers: list[str]) -> dict[str, Rectified | None]:
    """Per layer name, its :class:`Rectified` response in the recorded pass ``tr``, or None."""
    modules = dict(model.named_modules())
    out: dict[str, Rectified | None] = {}
    for name in layers:
        calls = [c for c in tr.module_calls() if c.name == name and c.output is not None]
        found = [_of_value(tr, c.output, modules) for c in calls]
        ok = found and found[0] is not None and all(found[0].same(f) for f in found[1:])
        out[name] = replace(found[0], sites=tuple(sorted({i for f in found for i in f.sites}))) if ok else None
    return out


def rectified_responses(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, Rectified | None]:
    """Per layer, its rectified response, found by tracing one forward pass of ``model`` on ``x`` (one image is
    enough; the model should be in eval mode, as for the statistics)."""
    return rectified_of_trace(trace_forward(model, x), model, layers)
