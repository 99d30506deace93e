"""The optimisation loop: a batch of images, one objective value per image, one forward pass per step.

The loss is the *sum* of the per-image objectives, so each image receives exactly the gradient it
would get alone (eval mode: no batch statistics), and Adam, being elementwise, moves it exactly
as it would move it alone. Rendering a layer's channels in one batch therefore gives the same
images as rendering them one at a time (up to float rounding) when the transforms are off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from probe.errors import NumericalError
from probe.hooks import check_layers, layer_outputs, model_device
from probe.models.head import scores_model
from probe.synthesis import objectives
from probe.synthesis.objectives import LOGITS, Objective
from probe.synthesis.param import ImageParam
from probe.synthesis.transform import Transforms


def forward_capture(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` for input ``x``, with autograd (:func:`probe.hooks.layer_outputs`); ``"logits"``
    (:data:`LOGITS`) is the model's output.

    For class scores ``model`` must return them: :func:`probe.models.head.scores_model` (what :func:`render` uses) turns a
    model ending in a (log-)softmax into one that returns the logits before it. The forward pass
    stops as soon as every requested layer is captured, unless logits are needed. Raises RuntimeError
    naming the layers that produced no tensor output.
    """
    names = [n for n in dict.fromkeys(layers) if n != LOGITS]
    out, acts = layer_outputs(model, x, names, output=LOGITS in layers)
    missing = [n for n in names if n not in acts]
    if missing:
        raise RuntimeError(f"layers {missing} produced no tensor output in the forward pass")
    if out is not None:
        acts[LOGITS] = out
    return acts


class _RedirectedReLUFn(torch.autograd.Function):
    """ReLU whose gradient, for an image where the ordinary ReLU gradient is zero everywhere, lets
    through the components that would raise the input (Lucid's redirected ReLU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        relu_grad = g * (x >= 0)
        alive = relu_grad.flatten(1).ne(0).any(1)
        if bool(alive.all()):  # the usual case: plain ReLU gradient
            return relu_grad
        redirected = g * ~((x < 0) & (g > 0))  # g > 0: a descent step would lower x further
        return torch.where(alive.view(-1, *[1] * (g.dim() - 1)), relu_grad, redirected)


@contextlib.contextmanager
def redirected_relus(model: nn.Module):
    """Within the block, every ``nn.ReLU`` module of ``model`` (in place or not) uses the redirected gradient."""
    handles, stash = [], {}

    def pre(module, inputs):
        stash[id(module)] = inputs[0].clone() if getattr(module, "inplace", False) else inputs[0]

    def post(module, _inputs, _output):
        return _RedirectedReLUFn.apply(stash.pop(id(module)))

    for m in model.modules():
        if isinstance(m, nn.ReLU):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no weight gradients (only the image is optimised), restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


@dataclass
class RenderResult:
    pixels: torch.Tensor  # (N, C, H, W) in [0, 1], on the CPU
    objective: torch.Tensor  # (N,) objective on the final images, without transforms
    acts: dict[str, torch.Tensor]  # the objective's layers on the final images, without transforms (CPU)
    failed_step: torch.Tensor  # (N,) step at which the objective went non-finite, -1 where it never did
    transparency: torch.Tensor  # (N, C, H, W): sum over steps of |d objective / d pixels| (MACO's transparency map)


class Normalize(nn.Module):
    """Pixels in [0, 1] -> the model's input, ``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def render(model: nn.Module, objective: Objective, param: ImageParam, *, steps: int, lr: float = 0.05,
           mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), transforms: Transforms | None = None,
           seed: int = 0, redirect_relu_steps: int = 0, labels: Sequence[str] | None = None,
           on_nan: str = "error") -> RenderResult:
    """Maximise ``objective`` (one value per image) over ``param``'s ``N`` images with Adam.

    Each step evaluates the objective on ``transforms.copies`` transformed versions of the images and
    maximises its mean over them. ``transparency`` accumulates ``|d objective / d pixels|`` over the steps
    (pixels before transforms): MACO's transparency map (Fel et al. 2023, section 3), where the optimisation
    looked. ``labels[i]`` names image ``i`` in error messages ("layer conv1 channel 3"). A non-finite
    objective raises :class:`NumericalError` (``on_nan="error"``) or freezes that image at its last
    finite parameters and records the step (``on_nan="skip"``). An objective on :data:`LOGITS` sees the
    class scores before a final (log-)softmax (:func:`probe.models.head.scores_model`); ``acts[LOGITS]`` holds them.
    """
    transforms = transforms or Transforms.off()
    norm = Normalize(mean, std)
    gen = torch.Generator().manual_seed(int(seed))
    n = param.n
    labels = list(labels) if labels is not None else [f"image {i}" for i in range(n)]
    failed_step = torch.full((n,), -1, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool, device=param.params.device)
    transparency = None
    opt = torch.optim.Adam([param.params], lr=lr)
    with frozen(model):  # eval mode before the head is traced: no batch-norm statistics change
        if LOGITS in objective.layers:
            with torch.no_grad():
                model = scores_model(model, norm(param()))
        for step in range(steps):
            redirect = redirected_relus(model) if step < redirect_relu_steps else contextlib.nullcontext()
            with redirect:
                pixels = param()
                pixels.retain_grad()
                obj = _mean_over_copies(model, objective, pixels, norm(transforms(_stack_copies(pixels, transforms), gen)))
            bad = ~torch.isfinite(obj.detach()) & alive
            if bad.any():
                i = int(bad.nonzero()[0])
                msg = (f"render: objective {objective.name} is {float(obj.detach()[i])} for {labels[i]} at step {step} "
                       f"(lower lr, add regularisers to the objective, or pass on_nan='skip')")
                if on_nan == "error":
                    raise NumericalError(msg)
                failed_step[bad.cpu()] = step
                alive &= ~bad
            if not alive.any():
                break
            opt.zero_grad(set_to_none=False)
            (-torch.where(alive, obj, torch.zeros_like(obj)).sum()).backward()
            step_grad = pixels.grad.detach().abs()
            transparency = step_grad if transparency is None else transparency + step_grad
            keep = param.params.detach().clone() if not alive.all() else None
            g = param.params.grad
            g.copy_(torch.where(alive.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g)))
            opt.step()
            if keep is not None:  # frozen images keep their last finite parameters
                with torch.no_grad():
                    param.params[~alive] = keep[~alive]
        with torch.no_grad():
            pixels = param()
            acts = forward_capture(model, norm(pixels), objective.layers)
            obj = objective(acts, pixels)
    if transparency is None:
        transparency = torch.zeros_like(pixels)
    return RenderResult(pixels.detach().cpu(), obj.detach().cpu(),
                        {k: v.detach().cpu() for k, v in acts.items()}, failed_step, transparency.cpu())


def _stack_copies(pixels: torch.Tensor, transforms: Transforms) -> torch.Tensor:
    """``transforms.copies`` copies of the batch, stacked: copy ``j`` of image ``i`` is row ``j * N + i``."""
    return pixels if transforms.copies == 1 else pixels.repeat(transforms.copies, 1, 1, 1)


def _mean_over_copies(model: nn.Module, objective: Objective, pixels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The objective ``(N,)`` averaged over the stacked transformed copies ``x`` ``(copies * N, C, H, W)``."""
    n = pixels.shape[0]
    acts = forward_capture(model, x, objective.layers)
    copies = x.shape[0] // n
    values = [objective({k: v[j * n:(j + 1) * n] for k, v in acts.items()}, pixels) for j in range(copies)]
    return values[0] if copies == 1 else torch.stack(values).mean(0)


def render_layer(model: nn.Module, layer: str, channels: Sequence[int] | None = None, *,
                 input_shape: tuple[int, int, int], steps: int = 256, lr: float = 0.05,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), kind: str = "mean",
                 param: str = "fourier", color: torch.Tensor | None = None, transforms: Transforms | None = None,
                 seed: int = 0, redirect_relu_steps: int = 0, on_nan: str = "error") -> RenderResult:
    """Feature visualisation of ``layer``: one image per channel, all optimised together in one batch.

    Image ``i`` maximises channel ``channels[i]`` (default: every channel of the layer), its spatial mean
    (``kind="mean"``) or squared norm (``"squared_norm"``, :func:`probe.synthesis.objectives.channel`).
    ``input_shape``: ``(C, H, W)`` of the images; ``param``: ``"fourier"`` or ``"pixel"``
    (:class:`probe.synthesis.param.ImageParam`; ``color``: a ``(C, C)`` colour decorrelation, e.g.
    :func:`probe.synthesis.param.color_sqrt` of training pixels), seeded by the channel index so an image does
    not depend on which others are rendered with it; ``mean`` / ``std``: the model's input normalisation
    (pixels are in [0, 1]); ``transforms``: robustness transforms (default none). The rest is :func:`render`'s.
    Returns its :class:`RenderResult`: ``pixels`` ``(len(channels), C, H, W)`` in [0, 1], ``objective`` per image.
    """
    check_layers(model, [layer], key="layer")
    device = model_device(model)
    if channels is None:
        with torch.no_grad(), frozen(model):
            width = forward_capture(model, torch.zeros(1, *input_shape, device=device), [layer])[layer].shape[1]
        channels = range(width)
    channels = [int(c) for c in channels]
    image = ImageParam(len(channels), input_shape[0], tuple(input_shape[1:]), kind=param, color=color, seeds=channels,
                       device=device)
    return render(model, objectives.channel(layer, channels, kind), image, steps=steps, lr=lr, mean=mean, std=std,
                  transforms=transforms, seed=seed, redirect_relu_steps=redirect_relu_steps,
                  labels=[f"layer {layer} channel {c}" for c in channels], on_nan=on_nan)
