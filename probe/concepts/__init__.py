"""Concepts a layer uses and how much each class score depends on them: CRAFT (Fel et al., "CRAFT: Concept
Recursive Activation FacTorization for Explainability", CVPR 2023, arXiv:2211.10154), offline and batched.

- :mod:`probe.concepts.factorise` (Sec. 3.1): :class:`ActivationSample`, a bounded uniform sample of a layer's
  rectified activations (one row per spatial position); :func:`fit_concepts`, their NMF ``A ~ U W`` into a
  :class:`Concepts` bank; :func:`k_curve`, the reconstruction error for several ``k``.
- :mod:`probe.concepts.importance` (Sec. 3.2): :func:`sobol_importance`, total Sobol indices of the concepts
  for class scores (scrambled Sobol' masks, Jansen's estimator); :func:`head_from_layer`, a model after a layer.
- :mod:`probe.concepts.stability`: :func:`match_concepts` (Hungarian matching on the cosine of the directions,
  within one layer) and :func:`split_halves_stability`; :func:`match_by_coefficients` (on the correlation of the
  coefficients over the same images, across networks).
"""

from probe.concepts.factorise import ActivationSample, Concepts, activation_rows, fit_concepts, k_curve, relative_error
from probe.concepts.importance import head_from_layer, jansen_total, sobol_design, sobol_importance
from probe.concepts.stability import Matching, match_by_coefficients, match_concepts, split_halves_stability

__all__ = ["ActivationSample", "Concepts", "Matching", "activation_rows", "fit_concepts", "head_from_layer",
           "jansen_total", "k_curve", "match_by_coefficients", "match_concepts", "relative_error", "sobol_design",
           "sobol_importance", "split_halves_stability"]
