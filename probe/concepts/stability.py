"""Are the concepts a property of the layer or of the sample, of the network or of its seed? Matching two banks.

NMF concepts (CRAFT, Fel et al., CVPR 2023, arXiv:2211.10154, Sec. 3.1) come in no particular order, so two
banks are compared after a one-to-one matching of their concepts (the Hungarian algorithm), on one of two
similarities:

- :func:`match_concepts`: the cosine of the directions (rows of ``W``). It means something only for two banks of
  **the same layer of the same network**, whose channels are the same axes: :func:`split_halves_stability` fits
  concepts on two disjoint random halves of the samples and reports how many find a close partner.
- :func:`match_by_coefficients`: the Pearson correlation, over the same images, of the two concepts' per-image
  coefficients. It compares banks of **different networks** (two seeds, two architectures, trained and
  untrained), whose channels are unrelated (a permutation at best, Li et al. 2016): a concept is the same when
  it is present in the same images, as units are matched by the correlation of their activations
  (Li et al., "Convergent Learning", ICLR 2016, Sec. 2).

CRAFT itself measures neither; both are checks that a bank is worth reading.
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
    """A one-to-one matching of two concept banks: ``pairs`` ``(m, 2)`` ``(concept of a, concept of b)`` sorted by
    the first, ``scores`` ``(m,)`` their similarities (cosine or correlation), ``m = min(k_a, k_b)``;
    ``similarity`` the full ``(k_a, k_b)`` matrix."""

    pairs: np.ndarray
    scores: np.ndarray
    similarity: np.ndarray

    def share_above(self, threshold: float = 0.8) -> float:
        """The fraction of the smaller bank's concepts matched with a similarity > ``threshold``."""
        return float((self.scores > threshold).mean())


def match_concepts(W_a, W_b) -> Matching:
    """Match the rows of ``W_a`` ``(k_a, C)`` to those of ``W_b`` ``(k_b, C)`` one to one, maximising the sum of
    cosine similarities (``scipy.optimize.linear_sum_assignment``; every concept of the smaller bank is matched)."""
    a, b = _directions(W_a, "W_a"), _directions(W_b, "W_b")
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"W_b: {b.shape[1]} channels, but W_a has {a.shape[1]}; both must have the same")
    return _hungarian(a @ b.T)


def _hungarian(sim: np.ndarray) -> Matching:
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return Matching(pairs=np.stack([rows, cols], axis=1), scores=sim[rows, cols], similarity=sim)


def match_by_coefficients(U_a, U_b) -> Matching:
    """Match the concepts of two banks fitted on different networks, by their coefficients on the same images:
    ``U_a`` ``(N, k_a)`` and ``U_b`` ``(N, k_b)``, row ``i`` the same image for both (e.g. each concept's spatial
    mean coefficient on it). The similarity of concepts ``i`` and ``j`` is the Pearson correlation over the
    images of ``U_a[:, i]`` and ``U_b[:, j]`` (0 for a concept that is constant over them); the matching
    maximises its sum one to one (``scipy.optimize.linear_sum_assignment``)."""
    a, b = (np.asarray(U, dtype=np.float64) for U in (U_a, U_b))
    for key, U in (("U_a", a), ("U_b", b)):
        if U.ndim != 2 or U.shape[0] < 2 or U.shape[1] == 0:
            raise ConfigError(f"{key}: shape {U.shape} is not allowed; must be (images >= 2, concepts >= 1)")
    if a.shape[0] != b.shape[0]:
        raise ConfigError(f"U_b: {b.shape[0]} images, but U_a has {a.shape[0]}; both must hold the same images")
    z = [(U - U.mean(0)) / np.where(U.std(0) == 0, np.inf, U.std(0)) for U in (a, b)]
    return _hungarian(z[0].T @ z[1] / len(a))


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
