"""Are the concepts a property of the layer or of the sample? Matching two concept banks.

NMF concepts (CRAFT, Fel et al., CVPR 2023, arXiv:2211.10154, Sec. 3.1) come in no particular order, so two
banks are compared after a one-to-one matching of their concepts: :func:`match_concepts` (Hungarian algorithm
on the cosine similarity of the directions). :func:`split_halves_stability` fits concepts on two disjoint
random halves of the samples and reports how many find a close partner in the other half. CRAFT itself does
not measure this; it is a check that a bank is worth reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from probe.errors import ConfigError
from probe.concepts.factorise import _check_activations, fit_concepts


def _directions(W, key: str) -> np.ndarray:
    W = np.asarray(W.detach().cpu() if isinstance(W, torch.Tensor) else W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ConfigError(f"{key}: shape {W.shape} is not allowed; must be (concepts, channels), non-empty")
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    return W / np.where(norms == 0, 1.0, norms)  # a zero row has cosine 0 with everything


@dataclass(eq=False)
class Matching:
    """A one-to-one matching of two concept banks: ``pairs`` ``(m, 2)`` ``(row of W_a, row of W_b)`` sorted by
    the first, ``cosines`` ``(m,)`` their cosine similarities, ``m = min(k_a, k_b)``; ``similarity`` the full
    ``(k_a, k_b)`` cosine matrix."""

    pairs: np.ndarray
    cosines: np.ndarray
    similarity: np.ndarray

    def share_above(self, threshold: float = 0.8) -> float:
        """The fraction of the smaller bank's concepts matched with cosine > ``threshold``."""
        return float((self.cosines > threshold).mean())


def match_concepts(W_a, W_b) -> Matching:
    """Match the rows of ``W_a`` ``(k_a, C)`` to those of ``W_b`` ``(k_b, C)`` one to one, maximising the sum of
    cosine similarities (``scipy.optimize.linear_sum_assignment``; every concept of the smaller bank is matched)."""
    a, b = _directions(W_a, "W_a"), _directions(W_b, "W_b")
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"W_b: {b.shape[1]} channels, but W_a has {a.shape[1]}; both must have the same")
    sim = a @ b.T
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return Matching(pairs=np.stack([rows, cols], axis=1), cosines=sim[rows, cols], similarity=sim)


def split_halves_stability(A: np.ndarray, k: int, seed: int = 0, threshold: float = 0.8,
                           max_iter: int = 1000) -> float:
    """Fit ``k`` concepts (:func:`fit_concepts`, ``seed``) on each of two disjoint random halves of the rows of
    ``A`` (a permutation by ``numpy.random.default_rng(seed)``; an odd last row is left out), match them
    (:func:`match_concepts`) and return the share matched with cosine > ``threshold``: 1 when both halves
    find the same concepts."""
    A = _check_activations(A)
    half = len(A) // 2
    if half < k:
        raise ConfigError(f"A: {len(A)} samples cannot be split into two halves of at least k = {k}")
    order = np.random.default_rng(seed).permutation(len(A))
    first = fit_concepts(A[order[:half]], k, seed=seed, max_iter=max_iter)
    second = fit_concepts(A[order[half : 2 * half]], k, seed=seed, max_iter=max_iter)
    return match_concepts(first.W, second.W).share_above(threshold)
