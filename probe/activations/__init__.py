"""Activations: filters, feature maps, streaming population statistics and dataset exemplars.

Public surface: :class:`LogGrid` (the fixed histogram grid), :class:`LayerStats` /
:class:`PopulationStats` (mergeable streaming statistics), :class:`TopK` (streaming exemplars) and
:func:`collect` (one forward pass per batch feeds all of them).
"""

from probe.activations.exemplars import TopK
from probe.activations.grid import LogGrid
from probe.activations.population import collect
from probe.activations.stats import LayerStats, PopulationStats

__all__ = ["LayerStats", "LogGrid", "PopulationStats", "TopK", "collect"]
