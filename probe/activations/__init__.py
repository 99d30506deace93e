"""Activations: filters, feature maps, streaming population statistics and dataset exemplars.

Public surface: :func:`collect` (one forward pass per batch feeds every layer's statistics and exemplars)
returning :class:`PopulationStats` (mergeable: :class:`LayerStats` and :class:`TopK` exemplars per layer),
on the fixed histogram grid :class:`LogGrid`.
"""

from probe.activations.exemplars import TopK
from probe.activations.grid import LogGrid
from probe.activations.population import collect
from probe.activations.stats import LayerStats, PopulationStats

__all__ = ["LayerStats", "LogGrid", "PopulationStats", "TopK", "collect"]
