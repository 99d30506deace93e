"""A copy of a model that attribution hooks can use safely, and the layer Grad-CAM reads by default.

What is attributed: the logit (pre-softmax score) of the target class, for every model
(Simonyan et al. 2014, section 3; Selvaraju et al. 2017, section 3: "the gradient of the score
for class c, y^c (before the softmax)"). A model whose output comes out of a final
(log-)softmax (LeNet-5's ``LogSoftmax``) is attributed through :func:`probe.models.head.logits_model`,
which returns the softmax's input; a torchvision classifier already ends in logits and is unchanged.
Differentiating the log-probability instead loses, in float32, the target's own term when p rounds
to 1 (the gradient of log p is then ~0 and made of rounding error).

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

from probe.hooks import check_layers
from probe.errors import ConfigError
from probe.models.head import logits_model, softmax_head
from probe.trace import ForwardTrace, Key, trace_forward

TARGET_OUTPUT = "logit"  # what every method attributes (written to metrics.json and maps.npz)


def attribution_copy(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Deep copy in eval mode whose forward returns the logits (the input of a final (log-)softmax, if any),
    every ``nn.ReLU`` out of place, parameters not requiring gradients. ``example``: an input batch
    (N, C, H, W) like the images to attribute (one image is traced to find the head)."""
    m = copy.deepcopy(model).eval()  # eval before tracing: a BatchNorm in training mode would update its stats
    m = logits_model(m, example).eval()
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def output_head(model: nn.Module, example: torch.Tensor) -> str | None:
    """"softmax" / "log_softmax" when ``model``'s output comes out of that function, else None."""
    m = copy.deepcopy(model).eval()
    return softmax_head(trace_forward(m, example[:1]))


def _spatial(shape) -> bool:
    return shape is not None and len(shape) == 4 and shape[-2] * shape[-1] > 1


def _innermost_once(tr: ForwardTrace, k: Key, once: set[str]) -> str | None:
    """The innermost module called exactly once whose output is the value ``k`` (module post-hooks fire
    innermost first, so the first such call in the trace), never the model itself."""
    return next((c.name for c in tr.module_calls() if c.output == k and c.name and c.name in once), None)


def _ancestors(name: str) -> list[str]:
    """Dotted-name ancestors of a module, innermost first, without the model itself ("")."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def default_gradcam_layer(model: nn.Module, x: torch.Tensor, key: str = "gradcam_layer") -> tuple[str, str]:
    """(layer, rule): the default Grad-CAM layer of ``model`` on inputs like ``x``, and which rule chose it
    (none found: :class:`probe.errors.ConfigError` naming ``key``).

    Grad-CAM is defined on the rectified feature maps of the last convolutional layer (Selvaraju et
    al. 2017, section 3), i.e. the output of the last convolutional block after its non-linearity.
    From one traced forward pass (:func:`probe.trace.trace_forward`):

    ``"last rectifier"``: R is the output of the last rectifier call (ReLU / ReLU6, module or functional)
    that is 4-D with H*W > 1 (a 1x1 map makes the CAM one constant over the image). The block is the
    outermost enclosing module (by dotted name, called once) whose output is still 4-D of R's H x W:
    the same value in a residual stage, or the concatenation of rectified branches in an Inception
    block (``Mixed_7c``), but not a pooled map after it (LeNet-5's ``pool2``). The layer is the innermost
    module called exactly once whose output is the block's output (a reused ReLU module cannot be read
    once: torchvision ResNet-18 gives ``layer4.1``; ``resnet_small`` gives ``layer3.0.relu2``, the block's
    output, not the 1x1 shortcut convolution executed last; LeNet-5 gives ``relu2``, conv3's map is 1x1).

    ``"last feature map"``, when the net has no such rectifier (SiLU / GELU nets) or no module returns its
    output (a functional ReLU at the top of ``forward``): the last module output, in execution order, that
    is 4-D with H*W > 1, again the innermost module called once that returns it.
    """
    m = copy.deepcopy(model).eval()
    tr = trace_forward(m, x[:1])
    once = {n for n, k in tr.times_called().items() if k == 1}
    output = {c.name: c for c in tr.module_calls() if c.name in once}
    rect = [c for c in tr.calls if c.kind == "rectifier" and _spatial(c.shape)]
    if rect:
        r = rect[-1]
        inner = _innermost_once(tr, r.output, once)
        if inner is not None:
            block = inner
            for a in _ancestors(inner):
                c = output.get(a)
                if c is None or not _spatial(c.shape) or c.shape[-2:] != r.shape[-2:]:
                    break
                block = a
            return _innermost_once(tr, output[block].output, once), "last rectifier"
    for c in reversed(tr.module_calls()):
        if c.name and _spatial(c.shape):
            name = _innermost_once(tr, c.output, once)
            if name is not None:
                return name, "last feature map"
    raise ConfigError(f"{key}: the model has no layer with a 4-D output larger than 1x1 that is "
                      "called once; name a layer (or leave grad_cam out)")


def gradcam_layer(model: nn.Module, x: torch.Tensor, name: str | None, key: str = "gradcam_layer") -> str:
    """``name`` checked against the model (an unknown one raises :class:`probe.errors.LayerNotFound` naming
    ``key``), or :func:`default_gradcam_layer` (``x``: inputs like the images to attribute)."""
    if name is not None:
        check_layers(model, [name], key=key)
        return name
    return default_gradcam_layer(model, x, key)[0]
