"""Saliency: Captum attribution maps of the probe images, their faithfulness and sanity checks."""

from probe.saliency.config import METHODS, SaliencyConfig, SaliencyStage

__all__ = ["METHODS", "SaliencyConfig", "SaliencyStage"]
