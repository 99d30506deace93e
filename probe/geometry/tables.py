"""The equivariance and invariance tables of a model on a batch of images, from one forward pass of the
images and one per transform (:func:`transform_tables`; the stage and :func:`equivariance_table` /
:func:`invariance_table` all run it)."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
import torch.nn as nn

from probe.geometry import equivariance, invariance
from probe.geometry.fields import LayerField, layer_fields
from probe.geometry.invariance import Transform, transforms
from probe.hooks import batched_layer_outputs, model_device, module_types, resolve_layers


def transform_tables(model: nn.Module, x: torch.Tensor, layers: Sequence[str], ts: Sequence[Transform], *,
                     y: torch.Tensor | None = None, fields: dict[str, LayerField] | None = None,
                     batch_size: int = 128, device: torch.device | str = "cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(equivariance, invariance)`` of ``layers`` for images ``x`` ``(N, C, H, W)`` under the transforms ``ts``.

    Equivariance rows (:func:`probe.geometry.equivariance.equivariance_rows`) come from the shifts among
    ``ts`` and need the layers' ``fields`` (:func:`probe.geometry.fields.layer_fields`); invariance rows
    (:func:`probe.geometry.invariance.invariance_rows`) come from every transform and need the labels ``y``
    ``(N,)``. Without ``fields`` (``y``) that table is empty.
    """
    layers = list(layers)
    out0, base = batched_layer_outputs(model, x, layers, batch_size, device)
    types = module_types(model, layers)
    eq, inv = [], []
    for t in ts:
        out, acts = batched_layer_outputs(model, t.apply(x), layers, batch_size, device)
        if t.kind == "shift" and fields is not None:
            eq += equivariance.equivariance_rows(base, acts, layers, fields, types, t.mode, t.axis, int(t.amount),
                                                 x.shape[-2 if t.axis == "y" else -1])
        if y is not None:
            inv += invariance.invariance_rows(t, out0, base, out, acts, y, layers, types)
    return pd.DataFrame(eq, columns=equivariance.COLUMNS), invariance.invariance_frame(inv)


def equivariance_table(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None,
                       fields: dict[str, LayerField] | None = None, shifts: Sequence[int] = (1, 2, 3, 4),
                       axes: Sequence[str] = ("x", "y"), modes: Sequence[str] = ("circular", "zero"),
                       fill: torch.Tensor | float = 0.0, batch_size: int = 128,
                       device: torch.device | str | None = None) -> pd.DataFrame:
    """Translation equivariance ``||f(Tx) - T'f(x)|| / ||f(x)||``: one row per (layer with a spatial output,
    mode, axis, shift) for images ``x`` ``(N, C, H, W)`` (columns: :data:`probe.geometry.equivariance.COLUMNS`).

    ``layers``: default :func:`probe.hooks.default_layers`; ``fields``: where their units sit in the input,
    default traced from ``x[:1]`` (:func:`probe.geometry.fields.layer_fields`); ``shifts`` in input pixels;
    ``modes``: ``circular`` (``torch.roll``) and/or ``zero`` (``fill`` comes in: the normalised value of a black
    pixel, a float or ``(1, C, 1, 1)``); ``device``: default the model's. Columns: layer, type, depth (index in
    ``layers``), mode, axis, shift, stride, feature_shift (map units compared), feature_shift_exact (shift /
    stride), fractional, error (circular: whole maps; zero: the overlap), error_interior and interior_units
    (only units whose receptive field sees neither padding nor what came in at the border: NaN when there are
    none), map_size (units along the axis), map_h and map_w, measurable (False: the map is too small for the
    shift, :func:`probe.geometry.equivariance.measurable`; error and error_interior are NaN).
    """
    layers = resolve_layers(model, layers)
    device = model_device(model) if device is None else device
    if fields is None:
        _, example = batched_layer_outputs(model, x[:1], layers, batch_size, device)
        fields = layer_fields(model, x[:1].to(device), example)
    ts = transforms(list(shifts), list(axes), list(modes), [], [], fill)
    return transform_tables(model, x, layers, ts, fields=fields, batch_size=batch_size, device=device)[0]


def invariance_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str] | None = None,
                     ts: Sequence[Transform] | None = None, batch_size: int = 128,
                     device: torch.device | str | None = None) -> pd.DataFrame:
    """How much predictions and globally pooled features change under the transforms ``ts`` of images ``x``
    ``(N, C, H, W)`` with labels ``y`` ``(N,)``: one row per transform for the output (layer ``"output"``) and
    per transform and layer (columns: :data:`probe.geometry.invariance.COLUMNS`).

    ``layers``: default :func:`probe.hooks.default_layers`; ``ts``: default
    :func:`probe.geometry.invariance.transforms` of shifts 1-4 px (x and y, circular and zero-filled), rotations
    of +-5 and +-10 degrees and scalings by 0.9 and 1.1, with 0 (in the model's input units) coming in at the
    border; pass ``transforms(..., fill=black)`` for black in normalised inputs. ``device``: default the model's.
    ``change``: ``||g(Tx) - g(x)|| / ||g(x)||`` of the pooled features ``g`` (of the raw output for
    ``"output"``). Output rows also carry ``prob_change`` (mean total-variation distance between the
    softmax probabilities), ``survival`` (share of images whose predicted class is unchanged: ``k`` of
    ``n``, with Wilson's 95% interval ``survival_low``, ``survival_high``; null on layer rows),
    ``accuracy`` and ``accuracy_clean`` (on the untransformed images).
    """
    layers = resolve_layers(model, layers)
    device = model_device(model) if device is None else device
    if ts is None:
        ts = transforms([1, 2, 3, 4], ["x", "y"], ["circular", "zero"], [-10.0, -5.0, 5.0, 10.0], [0.9, 1.1])
    return transform_tables(model, x, layers, ts, y=y, batch_size=batch_size, device=device)[1]
