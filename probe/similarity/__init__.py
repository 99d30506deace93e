"""Representational similarity: how one network's representations differ from another's.

- :mod:`probe.similarity.cka`: linear CKA (Kornblith et al. 2019): :func:`linear_cka` (the full-data
  reference), :func:`hsic_unbiased`, :func:`hsic_biased`, and :class:`CKA`, the streaming, mergeable
  minibatch estimator (Nguyen et al. 2021) of every pair of named representations, with standard errors.
- :mod:`probe.similarity.matching`: :class:`UnitCorrelation`, the streaming correlation of every unit of one
  layer with every unit of another, and its semi- and one-to-one matchings (Li et al. 2016).
- :mod:`probe.similarity.population`: :func:`compare` streams the same images through several models once and
  feeds both, returning :class:`Similarity`.
"""

from probe.similarity.cka import CKA, centred_gram, hsic_biased, hsic_unbiased, linear_cka, u_centre
from probe.similarity.population import Similarity, compare
from probe.similarity.matching import UnitCorrelation

__all__ = ["CKA", "Similarity", "UnitCorrelation", "centred_gram", "compare", "hsic_biased", "hsic_unbiased",
           "linear_cka", "u_centre"]
