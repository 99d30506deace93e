"""Saliency: Captum attribution maps, their faithfulness (deletion, insertion, ROAD) and sanity checks (MPRT)."""

from probe.saliency.methods import METHODS

__all__ = ["METHODS"]
