"""The attribution methods, each through Captum, with one signature, and their reduction to (N, H, W).

Every method takes the attribution copy of the model (see :mod:`probe.saliency.prepare`), images
``x`` (N, C, H, W) normalised and ``target`` (N,) class indices, and returns attributions of the
copy's output for the target class: the logit (pre-softmax score; LeNet-5's final LogSoftmax is
bypassed there), as Simonyan et al. 2014 (section 3) and Selvaraju et al. 2017 (section 3) define.

Reduction over input channels, per method (:data:`REDUCTION`):

- ``saliency``, ``smoothgrad``, ``guided_backprop``: sum of absolute values (a magnitude: the sign
  of a gradient says which way a pixel would move the output, not whether it supports the class);
- ``input_x_gradient``, ``integrated_gradients``, ``occlusion``: signed sum (contributions that add
  up to the output change; positive = evidence for the target);
- ``grad_cam``: one channel already, non-negative (ReLU as in the paper).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
from captum.attr import (GuidedBackprop, InputXGradient, IntegratedGradients, LayerAttribution, LayerGradCam,
                         NoiseTunnel, Occlusion, Saliency)

from probe.errors import check_choice
from probe.saliency.batching import map_batches
from probe.saliency.prepare import attribution_copy, gradcam_layer

Reference = Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) -> reference images, same shape

REDUCTION = {"saliency": "abs", "smoothgrad": "abs", "guided_backprop": "abs", "input_x_gradient": "signed",
             "integrated_gradients": "signed", "occlusion": "signed", "grad_cam": "signed"}


@dataclass
class MethodSettings:
    """Method parameters in absolute units (pixels, normalised-input stdevs), resolved by the stage."""

    ig_steps: int = 32
    ig_internal_batch_size: int = 64
    ig_baseline: Optional[Reference] = None  # None: zeros in normalised space
    smoothgrad_samples: int = 16
    smoothgrad_stdev: float = 0.15  # absolute, in normalised input units
    smoothgrad_batch_size: int = 16
    gradcam_layer: Optional[str] = None
    occlusion_window: int = 4  # pixels
    occlusion_stride: int = 2  # pixels
    occlusion_baseline: Optional[Reference] = None
    occlusion_batch_size: int = 64  # occluded images per forward pass
    seed: int = 0


def _ref(fn: Optional[Reference], x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x) if fn is None else fn(x)


def saliency(model, x, target, s: MethodSettings):
    return Saliency(model).attribute(x, target=target, abs=True)


def input_x_gradient(model, x, target, s: MethodSettings):
    return InputXGradient(model).attribute(x, target=target)


def smoothgrad(model, x, target, s: MethodSettings):
    # seeded before each call: the same noise for the same images, whatever ran before
    torch.manual_seed(s.seed)
    return NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=s.smoothgrad_samples, nt_samples_batch_size=s.smoothgrad_batch_size,
        stdevs=float(s.smoothgrad_stdev), target=target, abs=True)


def integrated_gradients(model, x, target, s: MethodSettings):
    # Captum expands the batch by n_steps; internal_batch_size caps the rows per forward pass
    return IntegratedGradients(model).attribute(
        x, baselines=_ref(s.ig_baseline, x), target=target, n_steps=s.ig_steps,
        internal_batch_size=min(s.ig_internal_batch_size, len(x) * s.ig_steps))


def guided_backprop(model, x, target, s: MethodSettings):
    return GuidedBackprop(model).attribute(x, target=target)


def grad_cam(model, x, target, s: MethodSettings):
    layer = dict(model.named_modules())[s.gradcam_layer]
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")


def occlusion(model, x, target, s: MethodSettings):
    c = x.shape[1]
    return Occlusion(model).attribute(
        x, sliding_window_shapes=(c, s.occlusion_window, s.occlusion_window),
        strides=(c, s.occlusion_stride, s.occlusion_stride), baselines=_ref(s.occlusion_baseline, x),
        target=target, perturbations_per_eval=max(1, s.occlusion_batch_size // len(x)))


METHODS: dict[str, Callable] = {f.__name__: f for f in (saliency, input_x_gradient, smoothgrad, integrated_gradients,
                                                         guided_backprop, grad_cam, occlusion)}


def attribute(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, s: MethodSettings) -> torch.Tensor:
    """Attributions (N, C, H, W) (grad_cam: (N, 1, H, W)) of ``method`` for ``target``, detached."""
    x = x.detach().clone().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Captum warns on every call about hooks / grad requirements
        return METHODS[method](model, x, target, s).detach()


def reduce_channels(attr: torch.Tensor, method: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): sum of absolute values or signed sum, as :data:`REDUCTION` says."""
    return (attr.abs() if REDUCTION[method] == "abs" else attr).sum(1)


def compute_maps(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, s: MethodSettings,
                 batch_size: int = 64) -> torch.Tensor:
    """Maps (N, H, W) float32 on the CPU of ``method`` on the attribution copy ``model``
    (:func:`probe.saliency.prepare.attribution_copy`), reduced over channels (:func:`reduce_channels`), in chunks of
    ``batch_size`` images (halved on out-of-memory)."""
    def chunk(lo: int, hi: int) -> torch.Tensor:
        return reduce_channels(attribute(method, model, x[lo:hi], target[lo:hi], s), method).float().cpu()

    return map_batches(chunk, len(x), batch_size, what=f"saliency {method}")


def attribution_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, method: str = "saliency",
                     settings: MethodSettings | None = None, batch_size: int = 64) -> torch.Tensor:
    """Attribution maps (N, H, W) of ``model``'s class score (the logit, before any final (log-)softmax) for
    images ``x`` (N, C, H, W), as the model takes them, and ``target`` class indices (N,) (or one for all).

    ``method``: one of :data:`METHODS` (Captum underneath), reduced over input channels as :data:`REDUCTION`
    says; its knobs in ``settings`` (default :class:`MethodSettings`; ``gradcam_layer`` None: the last
    rectified convolutional block, :func:`probe.saliency.prepare.default_gradcam_layer`). ``model`` is not
    changed: the methods run on a copy (:func:`probe.saliency.prepare.attribution_copy`).

    >>> maps = attribution_maps(model, x, y, "integrated_gradients", MethodSettings(ig_steps=64))
    """
    check_choice("method", method, METHODS)
    target = torch.as_tensor(target, device=x.device).long().expand(len(x))
    amodel = attribution_copy(model, x[:1])
    s = settings or MethodSettings()
    if method == "grad_cam":
        s = replace(s, gradcam_layer=gradcam_layer(amodel, x[:1], s.gradcam_layer, key="settings.gradcam_layer"))
    return compute_maps(method, amodel, x, target, s, batch_size)


def occlusion_geometry(image_side: int, window: float, stride: float) -> tuple[int, int]:
    """Window and stride in pixels from fractions of the image side. The stride is lowered until the
    windows tile the image exactly: a pixel no window covers would get 0/0 from Captum."""
    w = max(1, min(image_side, round(window * image_side)))
    st = max(1, min(w, round(stride * image_side)))
    while (image_side - w) % st:
        st -= 1
    return w, st
