"""Saliency: Captum attribution maps, their faithfulness (deletion, insertion, ROAD) and sanity checks (MPRT).

Public surface: :func:`attribution_maps` (maps (N, H, W) of one of :data:`METHODS`, knobs in
:class:`MethodSettings`), :func:`faithfulness_metrics` (deletion / insertion and ROAD AUCs per image) and
:func:`reference` (black, mean or blurred reference images for baselines and substrates).
"""

from probe.saliency.faithfulness import faithfulness_metrics
from probe.saliency.methods import METHODS, MethodSettings, attribution_maps
from probe.saliency.substrates import reference

__all__ = ["METHODS", "MethodSettings", "attribution_maps", "faithfulness_metrics", "reference"]
