"""Concept extraction by non-negative factorisation of a layer's rectified activations.

CRAFT (Fel et al., "CRAFT: Concept Recursive Activation FacTorization for Explainability", CVPR 2023,
arXiv:2211.10154), Sec. 3.1: the activations ``A`` ``(n, C)`` (``n`` samples of a layer with ``C`` channels,
non-negative because they follow a ReLU) are factorised as ``A ~ U W`` with ``U >= 0`` ``(n, k)`` the
concept coefficients and ``W >= 0`` ``(k, C)`` the concept bank: each row of ``W`` is one concept, a
direction in the layer's activation space.

One sample here is one spatial position of one image (a ``C``-vector); CRAFT factorises the
average-pooled activations of random crops instead. Every position of an ``(N, C, H, W)`` map is a sample
(:func:`activation_rows`), so the coefficients of a whole map are ``(N, H*W, k)``
(:meth:`Concepts.transform_maps`), the input :func:`probe.concepts.importance.sobol_importance` expects.

- :class:`ActivationSample`: a seeded, memory-bounded uniform sample (reservoir) of those rows over a stream
  of batches, with the image and position of each kept row.
- :func:`fit_concepts` -> :class:`Concepts`: the NMF, concepts in a fixed order, unit-norm rows of ``W``.
- :func:`relative_error` and :func:`k_curve`: ``||A - U W||_F / ||A||_F``, and it for several ``k``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.decomposition import NMF, non_negative_factorization
from sklearn.exceptions import ConvergenceWarning

from probe.errors import ConfigError, NumericalError


# -- samples ------------------------------------------------------------------------------------------
def activation_rows(acts: torch.Tensor | np.ndarray, key: str = "acts") -> np.ndarray:
    """The samples of a layer's output: ``(N, C, H, W)`` -> ``(N*H*W, C)`` rows ordered image by image, then
    position by position (row-major ``h * W + w``); ``(N, C)`` -> ``(N, C)``. Rectified (clamped at 0) and
    float32. Raises :class:`ConfigError` naming ``key`` for another number of dimensions, and
    :class:`NumericalError` for NaN or Inf."""
    t = torch.as_tensor(acts).detach()
    if t.ndim not in (2, 4):
        raise ConfigError(f"{key}: shape {tuple(t.shape)} is not allowed; must be (N, C, H, W) or (N, C)")
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{key}: activations contain NaN or Inf")
    if t.ndim == 4:
        t = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.clamp_min(0).to(device="cpu", dtype=torch.float32).numpy()


class ActivationSample:
    """A uniform random sample of at most ``max_samples`` activation rows of everything passed to
    :meth:`update`, in ``O(max_samples * C)`` memory however many images are seen.

    Each spatial position of each image is one row of ``C`` rectified values (:func:`activation_rows`).
    Reservoir sampling (Vitter's algorithm R): the ``t``-th row seen (from 0) fills slot ``t`` while
    ``t < max_samples``; afterwards it replaces slot ``j = floor(u (t + 1))`` when ``j < max_samples``, with
    ``u`` the ``t``-th uniform draw of ``numpy.random.default_rng(seed)``. Every row seen then has the same
    probability ``max_samples / seen`` of being kept. One draw is taken per row in stream order, so the
    sample depends only on the seed and the rows, not on how the stream was cut into batches.

    ``images``: the index of each kept row's image, counting images over all updates from 0;
    ``positions``: its ``(h, w)`` in the map (``(0, 0)`` for ``(N, C)`` inputs); ``matrix()`` the rows.
    """

    def __init__(self, max_samples: int, seed: int = 0):
        if int(max_samples) != max_samples or max_samples < 1:
            raise ConfigError(f"max_samples: {max_samples} is not allowed; must be an integer >= 1")
        self.max_samples, self.seed = int(max_samples), seed
        self._rng = np.random.default_rng(seed)
        self.seen = 0  # rows seen
        self.seen_images = 0
        self._rows: np.ndarray | None = None  # (max_samples, C), allocated on the first update
        self._images = np.zeros(self.max_samples, dtype=np.int64)
        self._positions = np.zeros((self.max_samples, 2), dtype=np.int64)

    def update(self, acts: torch.Tensor) -> None:
        """Offer every position of a batch ``(N, C, H, W)`` (or ``(N, C)``) to the sample."""
        acts = torch.as_tensor(acts)
        rows = activation_rows(acts)
        n_img = int(acts.shape[0])
        h, w = (int(acts.shape[2]), int(acts.shape[3])) if acts.ndim == 4 else (1, 1)
        if self._rows is None:
            self._rows = np.zeros((self.max_samples, rows.shape[1]), dtype=np.float32)
        elif rows.shape[1] != self._rows.shape[1]:
            raise ConfigError(f"acts: {rows.shape[1]} channels, but earlier batches had {self._rows.shape[1]}")
        t = self.seen + np.arange(len(rows))  # stream index of each row
        slot = np.floor(self._rng.random(len(rows)) * (t + 1)).astype(np.int64)
        slot = np.where(t < self.max_samples, t, slot)
        take = np.flatnonzero(slot < self.max_samples)
        # several rows of one batch may pick the same slot: the last one wins, as in the sequential algorithm
        last = len(take) - 1 - np.unique(slot[take][::-1], return_index=True)[1]
        take = take[last]
        self._rows[slot[take]] = rows[take]
        per_image = h * w
        self._images[slot[take]] = self.seen_images + take // per_image
        self._positions[slot[take]] = np.stack([(take % per_image) // w, take % w], axis=1)
        self.seen += len(rows)
        self.seen_images += n_img

    def __len__(self) -> int:
        return min(self.seen, self.max_samples)

    def matrix(self) -> np.ndarray:
        """The kept rows ``(n, C)`` float32 (a copy), ``n = min(rows seen, max_samples)``."""
        if self._rows is None:
            raise ConfigError("ActivationSample: no activations yet; call update() first")
        return self._rows[: len(self)].copy()

    @property
    def images(self) -> np.ndarray:
        """``(n,)`` the image of each kept row (0-based over all updates)."""
        return self._images[: len(self)].copy()

    @property
    def positions(self) -> np.ndarray:
        """``(n, 2)`` the ``(h, w)`` of each kept row in its image's map."""
        return self._positions[: len(self)].copy()


# -- factorisation ------------------------------------------------------------------------------------
def _check_activations(A, key: str = "A") -> np.ndarray:
    """``A`` as a non-empty, finite, non-negative 2-D float32 array, or a :class:`ConfigError` naming ``key``."""
    A = np.asarray(A.detach().cpu() if isinstance(A, torch.Tensor) else A, dtype=np.float32)
    if A.ndim != 2:
        raise ConfigError(f"{key}: shape {A.shape} is not allowed; must be 2-D (samples, channels)")
    if A.shape[0] == 0 or A.shape[1] == 0:
        raise ConfigError(f"{key}: shape {A.shape} is empty; needs at least one sample and one channel")
    if not np.isfinite(A).all():
        raise NumericalError(f"{key}: contains NaN or Inf")
    if (A < 0).any():
        raise ConfigError(f"{key}: has negative values (min {A.min():.3g}); must be >= 0 (rectified activations)")
    return A


def relative_error(A: np.ndarray, U: np.ndarray, W: np.ndarray) -> float:
    """``||A - U W||_F / ||A||_F`` (0 for an all-zero ``A``, which ``U = 0`` reconstructs exactly)."""
    A = np.asarray(A, dtype=np.float64)
    norm = np.linalg.norm(A)
    if norm == 0:
        return 0.0
    return float(np.linalg.norm(A - np.asarray(U, np.float64) @ np.asarray(W, np.float64)) / norm)


@dataclass(eq=False)
class Concepts:
    """A concept bank (CRAFT Sec. 3.1): ``W`` ``(k, C)`` non-negative concept directions with unit L2 norm,
    ordered by total coefficient mass on the training samples (descending), and those samples' coefficients
    ``U`` ``(n, k)``, so that ``A ~ U W``. ``max_iter``: the solver's iteration limit, reused by
    :meth:`transform`."""

    W: np.ndarray
    U: np.ndarray
    max_iter: int = 1000

    @property
    def k(self) -> int:
        return self.W.shape[0]

    def transform(self, A: np.ndarray) -> np.ndarray:
        """Coefficients ``(n, k)`` of new activations ``A`` ``(n, C)`` with ``W`` fixed: for each row ``a``,
        ``argmin_{u >= 0} ||a - u W||`` (non-negative least squares, by scikit-learn's coordinate descent)."""
        A = _check_activations(A)
        if A.shape[1] != self.W.shape[1]:
            raise ConfigError(f"A: {A.shape[1]} channels, but the concepts have {self.W.shape[1]}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            U, _, _ = non_negative_factorization(A, H=self.W.astype(np.float32), n_components=self.k,
                                                 update_H=False, solver="cd", tol=1e-6, max_iter=self.max_iter)
        return U.astype(np.float32)

    def transform_maps(self, acts: torch.Tensor) -> np.ndarray:
        """Coefficients ``(N, H*W, k)`` of every position of a layer's output ``(N, C, H, W)`` (``(N, 1, k)``
        for ``(N, C)``), positions in row-major order (:func:`activation_rows`)."""
        return self.transform(activation_rows(acts)).reshape(int(acts.shape[0]), -1, self.k)

    def reconstruction_error(self, A: np.ndarray) -> float:
        """``||A - U W||_F / ||A||_F`` with ``U = transform(A)``: the share of ``A`` the concepts miss."""
        return relative_error(A, self.transform(A), self.W)


def fit_concepts(A: np.ndarray, k: int, seed: int = 0, max_iter: int = 1000) -> Concepts:
    """Factorise rectified activations ``A`` ``(n, C)`` into ``k`` concepts, ``A ~ U W`` (CRAFT Sec. 3.1).

    scikit-learn's NMF with the Frobenius loss, no regularisation, ``init="nndsvda"`` (deterministic: an SVD
    with zeros filled by the mean) and ``solver="cd"``: coordinate descent reaches a lower loss in fewer
    iterations than the multiplicative updates (``"mu"``), which are only needed for the other beta
    divergences, and its zeros are exact (``"mu"`` cannot move a coefficient away from 0 or to exactly 0).
    ``seed`` goes to scikit-learn's ``random_state`` (used by the SVD's randomised parts).

    NMF is unique only up to the order and scale of the concepts; this fixes both: rows of ``W`` are scaled
    to unit L2 norm (the columns of ``U`` by the inverse), and concepts are sorted by ``U.sum(0)``, descending
    (ties by NMF order). Raises :class:`ConfigError` (a ``ValueError``) naming ``A`` or ``k`` for negative,
    empty or non-2-D input and for ``k`` outside ``1..min(n, C)``.
    """
    A = _check_activations(A)
    n, C = A.shape
    if int(k) != k or not 1 <= k <= min(n, C):
        raise ConfigError(f"k: {k} is not allowed; must be an integer from 1 to min(samples, channels) = "
                          f"min({n}, {C}) = {min(n, C)}")
    k = int(k)
    nmf = NMF(n_components=k, init="nndsvda", solver="cd", beta_loss="frobenius", max_iter=max_iter, tol=1e-5,
              random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        U = nmf.fit_transform(A).astype(np.float64)
    W = nmf.components_.astype(np.float64)
    norms = np.linalg.norm(W, axis=1)
    norms[norms == 0] = 1.0  # a dead concept stays zero
    W, U = W / norms[:, None], U * norms[None, :]
    order = np.argsort(-U.sum(0), kind="stable")
    return Concepts(W=W[order].astype(np.float32), U=U[:, order].astype(np.float32), max_iter=max_iter)


def k_curve(A: np.ndarray, ks: Sequence[int], seed: int = 0, max_iter: int = 1000) -> np.ndarray:
    """The training relative reconstruction error ``||A - U W||_F / ||A||_F`` of :func:`fit_concepts` for each
    ``k`` in ``ks`` (an elbow plot for choosing ``k``), as a float array in the order of ``ks``."""
    A = _check_activations(A)
    errors = []
    for k in ks:
        c = fit_concepts(A, k, seed=seed, max_iter=max_iter)
        errors.append(relative_error(A, c.U, c.W))
    return np.asarray(errors)
