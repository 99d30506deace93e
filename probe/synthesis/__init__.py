"""Maximum-response synthesis: batched feature visualisation, class-model images and Deep Dream.

Lucent-like split: ``objectives`` (what to maximise, composable), ``param`` (how an image is
represented), ``transform`` (robustness), ``render`` (the loop), ``dream`` (Deep Dream), ``stage``
(``probe synthesize``).
"""

from probe.synthesis import objectives
from probe.synthesis.param import ImageParam, color_sqrt
from probe.synthesis.render import RenderResult, render
from probe.synthesis.transform import Transforms

__all__ = ["ImageParam", "RenderResult", "Transforms", "color_sqrt", "objectives", "render"]
