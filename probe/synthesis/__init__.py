"""Maximum-response synthesis: batched feature visualisation, class-model images and Deep Dream.

Lucent-like split: ``objectives`` (what to maximise, composable), ``param`` (how an image is
represented), ``transform`` (robustness), ``render`` (the loop, and :func:`render_layer`: every channel of
a layer in one call), ``dream`` (Deep Dream).
"""

from probe.synthesis import objectives
from probe.synthesis.dream import deep_dream_octaves
from probe.synthesis.param import ImageParam, color_sqrt
from probe.synthesis.render import RenderResult, render, render_layer
from probe.synthesis.transform import Transforms

__all__ = ["ImageParam", "RenderResult", "Transforms", "color_sqrt", "deep_dream_octaves", "objectives", "render",
           "render_layer"]
