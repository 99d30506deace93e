"""probe: what has this CNN learned, and how does it differ from that one?

The Python API works on any ``nn.Module`` and any batches of images, without Hydra or run dirs:

- models: :func:`build` (probe's zoo and torchvision classifiers by name), :func:`list_models`,
  :func:`register_model`, :func:`layer_table` (layers, output shapes, parameters, receptive fields)
  and :func:`format_table` (the lecture's layout);
- layers: :func:`default_layers`, :func:`layer_outputs` (one forward pass, the outputs of the layers
  named), :class:`Capture` (hooks for a ``with`` block);
- population statistics: :func:`collect` over any DataLoader -> :class:`PopulationStats` (streaming,
  mergeable, with exemplars);
- attributions: :func:`attribution_maps` (Captum methods, :class:`MethodSettings`) and their
  :func:`faithfulness_metrics` (deletion, insertion, ROAD);
- feature visualisation: :func:`render_layer`, or Lucent's pieces :mod:`objectives`, :class:`ImageParam`,
  :class:`Transforms`, :func:`render`; :func:`accentuate` (feature accentuation of real images);
- geometry: :func:`equivariance_table`, :func:`invariance_table`, :func:`erf_maps`;
- how networks differ: :func:`compare` (CKA of every layer pair of several models on the same images, units
  matched across them) over :class:`CKA`, :class:`UnitCorrelation` and :func:`linear_cka`;
- errors: :class:`LayerNotFound` (a ``ValueError`` listing the valid layer names).

Names are imported on first use, so ``import probe`` loads nothing heavy (and never Hydra or DVC).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_MODULES = {  # where each public name is defined
    "probe.models": ["build", "list_models", "register_model"],
    "probe.models.summary": ["layer_table", "format_table"],
    "probe.hooks": ["default_layers", "layer_outputs", "Capture"],
    "probe.activations": ["collect", "PopulationStats"],
    "probe.saliency": ["attribution_maps", "faithfulness_metrics", "MethodSettings"],
    "probe.synthesis": ["render_layer", "render", "objectives", "ImageParam", "Transforms", "accentuate"],
    "probe.geometry": ["equivariance_table", "invariance_table", "erf_maps"],
    "probe.similarity": ["compare", "CKA", "UnitCorrelation", "linear_cka"],
    "probe.errors": ["LayerNotFound"],
}
_API = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_API)

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from probe.activations import PopulationStats, collect
    from probe.errors import LayerNotFound
    from probe.geometry import equivariance_table, erf_maps, invariance_table
    from probe.hooks import Capture, default_layers, layer_outputs
    from probe.models import build, list_models, register_model
    from probe.models.summary import format_table, layer_table
    from probe.saliency import MethodSettings, attribution_maps, faithfulness_metrics
    from probe.similarity import CKA, UnitCorrelation, compare, linear_cka
    from probe.synthesis import ImageParam, Transforms, accentuate, objectives, render, render_layer


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'probe' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
