"""Maximum-response synthesis: batched feature visualisation, class-model images and Deep Dream.

Lucent-like split: ``objectives`` (what to maximise, composable), ``param`` (how an image is
represented: pixels, Fourier, MACO, PCA), ``transform`` (robustness, MACO's crops), ``render`` (the loop, and
:func:`render_layer`: every channel of a layer in one call), ``accentuate`` (feature accentuation from real
images), ``dream`` (Deep Dream) and ``judge`` (saturation, and which other models recognise a class image).
"""

from probe.synthesis import judge, objectives
from probe.synthesis.accentuate import accentuate
from probe.synthesis.dream import deep_dream_octaves
from probe.synthesis.param import ImageParam, color_sqrt
from probe.synthesis.render import RenderResult, render, render_layer
from probe.synthesis.transform import Transforms

__all__ = ["ImageParam", "RenderResult", "Transforms", "accentuate", "color_sqrt", "deep_dream_octaves", "judge",
           "objectives", "render", "render_layer"]
