"""Measured geometry of a CNN: translation equivariance, invariance, effective receptive fields,
and how features emerge during training.

Public surface: :func:`equivariance_table`, :func:`invariance_table` (with :func:`transforms` to choose the
transforms) and :func:`transform_tables` (both tables from one pass per transform), :func:`erf_maps` /
:func:`erf_size` (effective receptive fields, Luo et al. 2016) and :func:`layer_fields` (where each
layer's units sit in the input).
"""

from probe.geometry.erf import erf_maps, erf_size
from probe.geometry.fields import layer_fields
from probe.geometry.invariance import transforms
from probe.geometry.tables import equivariance_table, invariance_table, transform_tables

__all__ = ["equivariance_table", "erf_maps", "erf_size", "invariance_table", "layer_fields", "transform_tables",
           "transforms"]
