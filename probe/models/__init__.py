"""Models from anywhere: probe's zoo, torchvision and timm by name, any importable callable, entry points.

>>> from probe.models import build
>>> model = build("mynets.leaves:LeafNet", kwargs={"width": 16}, weights="leafnet.pt", output=1,
...               in_channels=3, num_classes=3, image_size=96)   # checked on zeros (2, 3, 96, 96)

See :mod:`probe.models.sources` for every kind of source and :func:`build` for the arguments.
"""

from __future__ import annotations

from probe.models import small  # noqa: F401  (registers probe's models)
from probe.errors import WeightsError
from probe.models.build import build
from probe.models.output import check_classifier, select_output
from probe.models.registry import ModelSpec, register_model
from probe.models.sources import ENTRY_POINT_GROUP, ModelError, Source, list_models, parse_source, spec
from probe.models.weights import is_weights_file

__all__ = ["ENTRY_POINT_GROUP", "ModelError", "ModelSpec", "Source", "WeightsError", "build", "check_classifier",
           "is_weights_file", "list_models", "parse_source", "register_model", "select_output", "spec"]
