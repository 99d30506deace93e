"""Measured geometry of a CNN: translation equivariance, invariance, effective receptive fields,
and how features emerge during training (``probe geometry run=<run dir>``)."""

from probe.geometry.equivariance import equivariance_table
from probe.geometry.erf import erf_maps, erf_size
from probe.geometry.invariance import invariance_table

__all__ = ["equivariance_table", "invariance_table", "erf_maps", "erf_size"]
