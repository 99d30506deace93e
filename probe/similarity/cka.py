"""Linear CKA between representations: the full-data reference and a streaming minibatch accumulator.

Definitions
-----------
A representation is a layer's output on ``n`` images, flattened to ``X (n, p)``: every element of the
output is a feature (``p = C * H * W`` for a conv map, ``F`` for a linear layer), as in Kornblith, Norouzi,
Lee & Hinton 2019, "Similarity of neural network representations revisited" (ICML), section 4.

- :func:`hsic_biased` ``(K, L)``: ``tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n`` (Gretton et al. 2005,
  the estimator Kornblith et al. use in section 3).
- :func:`hsic_unbiased` ``(K, L)``: the unbiased estimator of Song, Smola, Gretton, Bedo & Borgwardt 2012,
  "Feature selection via dependence maximization" (JMLR), equation 5, on ``K~``, ``L~`` (``K``, ``L`` with
  their diagonals set to 0)::

      [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2 / (n-2) 1^T K~ L~ 1] / (n (n-3))

  It needs ``n >= 4`` images.
- :func:`linear_cka` ``(X, Y)``: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the linear kernels
  ``K = X X^T``, ``L = Y Y^T`` of the column-centred features; biased, it equals
  ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` (Kornblith et al., section 3, equation 3); ``debiased``
  uses :func:`hsic_unbiased` (their "debiased" CKA). The brute-force reference: float64, all images at once.

Minibatch CKA (:class:`CKA`), after Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn the
same things?" (ICLR), section 3.1: for each minibatch ``b`` of ``n`` images the unbiased HSIC of every pair
of representations is computed; CKA is ``mean_b HSIC_b(K, L) / sqrt(mean_b HSIC_b(K, K) mean_b HSIC_b(L, L))``.
Each mean is unbiased for the population HSIC whatever the batch size, so the ratio converges to the
population's (debiased) CKA as the number of batches grows; the full-data :func:`linear_cka` with
``debiased=True`` estimates the same quantity. Biased HSIC would not do: with few images and many features
it makes two *independent* representations look similar (PITFALLS.md; tested).

How one minibatch is processed (each representation's Gram matrix is formed once, all pairs in one product):

1. :func:`centred_gram`: the features, centred by the batch mean in float32 into a reused work buffer, give
   ``K = Xc Xc^T`` ``(n, n)`` by a float32 matmul, taken to float64 for everything after. Unbiased HSIC
   does not change when features are centred (U-centring removes every term ``a_i + a_j``); centring first
   only keeps float32 from cancelling a large common mean. Measured (benchmarks/bench_similarity.py, 2-core
   CPU, MKL): float64 Grams cost 2-5x as much (all layers of two ResNet-18 at 64x64, batches of 64:
   0.16 s against 0.08 s a batch) and change CKA by at most 2e-8 at 64-image batches (6e-6 at 8-image
   ones: ``gram_precision``); ``precision="float64"`` gives the float64 Gram.
2. U-centring (Szekely & Rizzo 2014, "Partial distance correlation with methods for dissimilarities",
   Ann. Statist., section 2.2; float64): ``U_ij = K_ij - r_i / (n-2) - r_j / (n-2) + t / ((n-1)(n-2))``
   for ``i != j`` and ``U_ii = 0``, with ``r`` the row sums and ``t`` the total of ``K`` with its diagonal
   set to 0. Then ``HSIC_unbiased(K, L) = <U(K), U(L)>_F / (n (n-3))`` (tested against :func:`hsic_unbiased`),
   so the HSIC of every pair of the ``m`` representations is ``G G^T / (n (n-3))`` with ``G (m, n^2)`` the
   stacked U-centred Grams.

State (:meth:`CKA.state`), all float64 ``(m, m)`` arrays or smaller, never ``images x images`` beyond the
minibatch at hand: the sum over batches of the HSIC matrices ``S = sum H_b``, of their squares
``Q = sum H_b * H_b``, of ``A_ab = sum h_ab h_aa`` and ``D_ab = sum h_aa h_bb``, the sum of the
representations' mean squared norms (for the constant test) and the counts. Summing two states is the state
of the union of their batches, so shards that split at minibatch boundaries merge to the one-pass result.

Standard error: the delta method on the ratio ``f(u, v, w) = u / sqrt(v w)`` of the batch means of
``(h_ab, h_aa, h_bb)``: ``se^2 = g^T Sigma g / B`` with ``g = (1 / sqrt(v w), -f / (2 v), -f / (2 w))`` and
``Sigma`` the covariance (ddof 1) of the per-batch triples over the ``B`` batches, which ``S``, ``Q``, ``A``,
``D`` give. It treats the minibatches as independent draws (a shuffled loader; sorted data gives batches
that are not exchangeable and an se that means nothing), measures the spread of the estimate over image
samples at this batch size, and is NaN with fewer than two batches. A jackknife over batches would need
every batch's triples (memory growing with the images); the delta method needs only sums of products, so it
stays mergeable. Checked against the spread of CKA over independent repetitions (tests).

Batches: every batch must hold the same keys and at least 4 images (:meth:`CKA.update` raises otherwise:
unbiased HSIC is undefined below 4); batches count equally in the means, as in Nguyen et al., who use one
fixed minibatch size: a short last batch of a loader adds a noisier estimate with the same weight
(:func:`probe.similarity.compare` re-cuts the stream into equal minibatches and drops that remainder).

Constant representations: where the mean HSIC(K, K) of a representation is <= ``CONSTANT_TOL`` times the
square of its mean squared norm (all zeros: a dead layer; a constant map, up to float32 rounding), every
CKA with it is NaN, not an error: its similarity to anything is undefined.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import pandas as pd
import torch

from probe.files import write_npz

MIN_IMAGES = 4  # unbiased HSIC divides by n (n - 3) and (n - 1)(n - 2)
# mean HSIC(K, K) <= this * (mean ||x||^2)^2: a constant representation. Features of relative spread s (std / mean)
# give about s^4 / p; float32 rounding of a constant map leaves orders of magnitude less than 1e-20
CONSTANT_TOL = 1e-20
STATE_VERSION = 1


# -- the brute-force references (float64, one set of images) ----------------------------------------------
def _gram_f64(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    x = x.reshape(len(x), -1)
    x = x - x.mean(0)
    return x @ x.T


def hsic_biased(K, L) -> float:
    """Biased HSIC of two ``(n, n)`` Gram matrices: ``tr(K H L H) / (n - 1)^2`` (Gretton et al. 2005), with
    ``H K H`` formed by subtracting row and column means and the trace as ``sum(HKH * L^T)`` (``O(n^2)`` for the
    same number as the ``n^3`` matrix products)."""
    K, L = np.asarray(K, dtype=np.float64), np.asarray(L, dtype=np.float64)
    n = len(K)
    Kc = K - K.mean(0, keepdims=True) - K.mean(1, keepdims=True) + K.mean()
    return float((Kc * L.T).sum() / (n - 1) ** 2)


def hsic_unbiased(K, L) -> float:
    """Unbiased HSIC of two ``(n, n)`` Gram matrices, ``n >= 4`` (Song et al. 2012, equation 5), term by term
    (``tr(K~ L~) = sum(K~ * L~^T)``, ``1^T K~ L~ 1 = (K~^T 1) . (L~ 1)``)."""
    K, L = np.array(K, dtype=np.float64), np.array(L, dtype=np.float64)
    n = len(K)
    if n < MIN_IMAGES:
        raise ValueError(f"hsic_unbiased: needs at least {MIN_IMAGES} images (got {n})")
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    value = ((K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (K.sum(0) @ L.sum(1)))
    return float(value / (n * (n - 3)))


def linear_cka(X, Y, debiased: bool = False) -> float:
    """Linear CKA of ``X (n, ...)`` and ``Y (n, ...)`` (the same ``n`` images; each flattened to features), in
    float64 on all images at once (Kornblith et al. 2019, section 3; ``debiased``: with :func:`hsic_unbiased`).
    NaN where either representation is constant."""
    K, L = _gram_f64(X), _gram_f64(Y)
    if len(K) != len(L):
        raise ValueError(f"linear_cka: {len(K)} images against {len(L)}")
    hsic = hsic_unbiased if debiased else hsic_biased
    den = hsic(K, K) * hsic(L, L)
    return float(hsic(K, L) / math.sqrt(den)) if den > 0 else math.nan


# -- one minibatch ---------------------------------------------------------------------------------------
class Gram(NamedTuple):
    """One representation on one minibatch: its centred linear Gram ``(n, n)`` (float32 from the float32 path,
    else float64; the accumulator takes it to float64), the squared norm of the batch mean of its features
    (0-dim tensor) and its number of features. ``scale``: the mean squared norm of its raw features (for the
    constant test)."""

    matrix: torch.Tensor
    mean_sq: torch.Tensor
    features: int

    @property
    def scale(self) -> torch.Tensor:
        # mean ||x_i||^2 = mean ||x_i - m||^2 + ||m||^2
        return self.matrix.diagonal().double().sum() / self.matrix.shape[0] + self.mean_sq.double()


class _Workspace:
    """One float32 buffer reused for the centred features of every layer (a fresh (n, p) tensor per layer and
    batch costs page faults that took as long as the Gram itself on the CPU), and the ``(1, n)`` row of
    ``1 / n`` that averages a batch."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.avg: torch.Tensor | None = None

    def take(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        size = shape[0] * shape[1]
        if self.buf is None or self.buf.numel() < size or self.buf.device != device:
            self.buf = torch.empty(size, dtype=torch.float32, device=device)
        return self.buf[:size].view(shape)

    def average(self, n: int, device: torch.device) -> torch.Tensor:
        if self.avg is None or self.avg.shape[1] != n or self.avg.device != device:
            self.avg = torch.full((1, n), 1.0 / n, dtype=torch.float32, device=device)
        return self.avg


@torch.no_grad()
def centred_gram(x: torch.Tensor, precision: str = "float32", work: _Workspace | None = None) -> Gram:
    """The :class:`Gram` of a representation ``x (n, ...)`` on one minibatch (features centred by the batch
    mean; float32 matmul, or ``precision="float64"`` throughout). ``x`` is not modified; ``work``: a
    :class:`_Workspace` for the centred features (else fresh tensors). A handful of torch ops per call: the
    rest of the work is batched over all keys in :meth:`CKA.update_grams` (on a loaded CPU every small op can
    cost a scheduler slice; on a GPU, a kernel launch)."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision: '{precision}' is not allowed; allowed: float32, float64")
    n = x.shape[0]
    flat = x.detach().reshape(n, -1)
    p = flat.shape[1]
    if precision == "float64":
        f = flat.double()
        mean = f.mean(0, keepdim=True)
        xc = f - mean
    else:
        f = flat if flat.dtype == torch.float32 else flat.float()
        # the mean by a matmul (a column reduction of a row-major matrix is several times slower)
        avg = work.average(n, f.device) if work is not None else torch.full((1, n), 1.0 / n, device=f.device)
        mean = avg @ f
        xc = f - mean if work is None else torch.sub(f, mean, out=work.take((n, p), f.device))
    return Gram(xc @ xc.T, mean.square().sum(), p)


def u_centre(K: torch.Tensor) -> torch.Tensor:
    """The U-centred float64 matrix of a Gram matrix ``K`` ``(n, n)``, or of each of a stack ``(m, n, n)``
    (Szekely & Rizzo 2014): see the module docstring; ``<U(K), U(L)>_F / (n (n-3))`` is the unbiased HSIC."""
    n = K.shape[-1]
    U = K.to(torch.float64, copy=True)
    U.diagonal(dim1=-2, dim2=-1).zero_()
    r = U.sum(-1)
    total = r.sum(-1)
    U -= r[..., :, None] / (n - 2)
    U -= r[..., None, :] / (n - 2)
    U += (total / ((n - 1) * (n - 2)))[..., None, None]
    U.diagonal(dim1=-2, dim2=-1).zero_()
    return U


# -- the accumulator -------------------------------------------------------------------------------------
class CKA:
    """Streaming minibatch linear CKA of every pair of named representations (see the module docstring).

    Keys are any strings (``"lenet5/conv1"``): any number of models and layers in one pass, all pairs, each
    model against itself included. The keys are fixed by the first batch (their order is the order of the
    result); state lives on the device of the first batch.

    >>> acc = CKA()
    >>> for feats in minibatches:            # {"a/conv1": (n, C, H, W), "b/fc": (n, F), ...}
    ...     acc.update(feats)
    >>> acc.result()                          # key_a, key_b, cka, se, batches, images
    """

    FIELDS = ("hsic_sum", "hsic_sq", "hsic_cross", "self_outer", "scale_sum")

    def __init__(self, precision: str = "float32"):
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision: '{precision}' is not allowed; allowed: float32, float64")
        self.precision = precision
        self.keys: list[str] | None = None
        self.features: dict[str, int] = {}
        self.batches = 0
        self.images = 0
        self._work = _Workspace()

    # -- feeding -------------------------------------------------------------------------------------
    def gram(self, x: torch.Tensor) -> Gram:
        """:func:`centred_gram` with this accumulator's precision and work buffer (for callers that form the
        Grams inside forward hooks and pass them to :meth:`update_grams`)."""
        return centred_gram(x, self.precision, self._work)

    @torch.no_grad()
    def update(self, feats: Mapping[str, torch.Tensor]) -> None:
        """Add one minibatch: ``feats`` maps every key to its representation ``(n, ...)`` of the same ``n >= 4``
        images (each flattened to ``(n, features)``)."""
        self._check_batch({k: v.shape[0] for k, v in feats.items()})
        self.update_grams({k: self.gram(v) for k, v in feats.items()})

    @torch.no_grad()
    def update_grams(self, grams: Mapping[str, Gram]) -> None:
        """Add one minibatch given as a :class:`Gram` per key (from :meth:`gram`; the same checks as :meth:`update`)."""
        n = self._check_batch({k: g.matrix.shape[0] for k, g in grams.items()})
        if self.keys is None:
            self._init(list(grams), grams[next(iter(grams))].matrix.device)
            self.features = {k: g.features for k, g in grams.items()}
        for k, g in grams.items():
            if g.features != self.features[k]:
                raise ValueError(f"CKA: '{k}' has {g.features} features in this batch, {self.features[k]} before")
        # every key at once: one stack, one U-centring, one product
        Ks = torch.stack([grams[k].matrix.to(self.device) for k in self.keys]).double()
        scale = Ks.diagonal(dim1=1, dim2=2).sum(1) / n + torch.stack(
            [grams[k].mean_sq.to(self.device) for k in self.keys]).double()
        G = u_centre(Ks).reshape(len(self.keys), -1)
        H = (G @ G.T) / (n * (n - 3))
        d = H.diagonal()
        self.hsic_sum += H
        self.hsic_sq += H * H
        self.hsic_cross += H * d[:, None]
        self.self_outer += d[:, None] * d[None, :]
        self.scale_sum += scale
        self.batches += 1
        self.images += n

    def _check_batch(self, sizes: Mapping[str, int]) -> int:
        if not sizes:
            raise ValueError("CKA: a batch with no representations")
        if self.keys is not None and set(sizes) != set(self.keys):
            missing, extra = sorted(set(self.keys) - set(sizes)), sorted(set(sizes) - set(self.keys))
            raise ValueError(f"CKA: every batch needs the same keys; missing {missing}, unexpected {extra}")
        ns = set(sizes.values())
        if len(ns) != 1:
            raise ValueError(f"CKA: the representations of one batch must be of the same images; got sizes {dict(sizes)}")
        n = ns.pop()
        if n < MIN_IMAGES:
            raise ValueError(f"CKA: a minibatch needs at least {MIN_IMAGES} images for unbiased HSIC (got {n})")
        return n

    def _init(self, keys: list[str], device: torch.device) -> None:
        if len(set(keys)) != len(keys):
            raise ValueError("CKA: duplicate keys")
        self.keys, self.device = keys, torch.device(device)
        m = len(keys)
        for f in self.FIELDS:
            setattr(self, f, torch.zeros((m,) if f == "scale_sum" else (m, m), dtype=torch.float64, device=self.device))

    # -- shards ----------------------------------------------------------------------------------------
    def merge(self, other: "CKA") -> "CKA":
        """Add ``other`` (other minibatches of the same keys) into this one; returns self."""
        if other.keys is None:
            return self
        if self.keys is None:
            self._init(list(other.keys), other.device)
            self.features = dict(other.features)
        if set(other.keys) != set(self.keys):
            raise ValueError(f"CKA: cannot merge accumulators of different keys ({sorted(set(self.keys) ^ set(other.keys))})")
        if other.features != self.features:
            raise ValueError("CKA: cannot merge accumulators whose representations have different feature counts")
        idx = torch.tensor([other.keys.index(k) for k in self.keys], device=other.device)
        for f in self.FIELDS:
            v = getattr(other, f)
            v = v[idx] if v.dim() == 1 else v[idx][:, idx]
            getattr(self, f).add_(v.to(self.device))
        self.batches += other.batches
        self.images += other.images
        return self

    def state(self) -> dict[str, np.ndarray]:
        """The accumulator as numpy arrays (keys as a unicode array: no pickle needed)."""
        keys = self.keys or []
        out = {"meta": np.array([STATE_VERSION, self.batches, self.images], dtype=np.int64),
               "keys": np.array(keys, dtype=np.str_), "features": np.array([self.features[k] for k in keys], dtype=np.int64),
               "precision": np.array([self.precision], dtype=np.str_)}
        if self.keys is not None:
            out.update({f: getattr(self, f).cpu().numpy() for f in self.FIELDS})
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], device="cpu") -> "CKA":
        version, batches, images = (int(v) for v in state["meta"])
        if version != STATE_VERSION:
            raise ValueError(f"CKA: state version {version}, this probe reads {STATE_VERSION}")
        self = cls(str(np.asarray(state["precision"]).reshape(-1)[0]))
        keys = [str(k) for k in state["keys"]]
        if keys:
            self._init(keys, device)
            self.features = dict(zip(keys, (int(v) for v in state["features"])))
            for f in cls.FIELDS:
                getattr(self, f).copy_(torch.as_tensor(np.asarray(state[f], dtype=np.float64)))
        self.batches, self.images = batches, images
        return self

    def save(self, path: Path) -> None:
        """Write :meth:`state` to an ``.npz`` atomically (fixed zip timestamps: same state, same bytes)."""
        write_npz(Path(path), self.state())

    @classmethod
    def load(cls, path: Path, device="cpu") -> "CKA":
        with np.load(Path(path), allow_pickle=False) as z:
            return cls.from_state({k: z[k] for k in z.files}, device)

    # -- results ---------------------------------------------------------------------------------------
    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """``(cka, se)``, each ``(m, m)`` float64 in key order (symmetric; NaN where undefined)."""
        if self.keys is None:
            return np.zeros((0, 0)), np.zeros((0, 0))
        B = self.batches
        S, Q, A, D = (getattr(self, f).cpu().numpy() for f in ("hsic_sum", "hsic_sq", "hsic_cross", "self_outer"))
        scale = self.scale_sum.cpu().numpy() / B
        u = S / B  # mean HSIC of each pair
        v = np.diag(u)  # mean HSIC(K, K) of each key
        constant = v <= CONSTANT_TOL * scale**2
        vv = np.where(constant, np.nan, v)
        with np.errstate(invalid="ignore", divide="ignore"):
            root = np.sqrt(vv[:, None] * vv[None, :])
            f = u / root
            # a representation with itself: 1 exactly, no spread (rounding would leave ~1e-9 in se)
            f[np.diag_indices_from(f)] = np.where(constant, np.nan, 1.0)
            if B < 2:
                return f, np.full_like(f, np.nan)
            # covariances (ddof 1) of the per-batch triples (h_ab, h_aa, h_bb) from the sums of products
            sa = np.diag(S)
            def cov(sxy, sx, sy):
                return (sxy - sx * sy / B) / (B - 1)
            var_u = cov(Q, S, S)
            var_v = cov(np.diag(Q), sa, sa)
            c_uv = cov(A, S, sa[:, None])  # cov(h_ab, h_aa)
            c_uw = cov(A.T, S, sa[None, :])  # cov(h_ab, h_bb)
            c_vw = cov(D, sa[:, None], sa[None, :])  # cov(h_aa, h_bb)
            gu, gv, gw = 1.0 / root, -f / (2 * vv[:, None]), -f / (2 * vv[None, :])
            var = (gu * gu * var_u + gv * gv * var_v[:, None] + gw * gw * var_v[None, :]
                   + 2 * gu * gv * c_uv + 2 * gu * gw * c_uw + 2 * gv * gw * c_vw) / B
            se = np.sqrt(np.maximum(var, 0.0))
            se[np.diag_indices_from(se)] = np.where(constant, np.nan, 0.0)
        return f, se

    def matrix(self, what: str = "cka") -> pd.DataFrame:
        """The ``(m, m)`` matrix of ``"cka"`` or ``"se"`` as a DataFrame indexed by key on both axes."""
        if what not in ("cka", "se"):
            raise ValueError(f"what: '{what}' is not allowed; allowed: cka, se")
        f, se = self.matrices()
        keys = self.keys or []
        return pd.DataFrame(f if what == "cka" else se, index=keys, columns=keys)

    def result(self) -> pd.DataFrame:
        """One row per unordered pair of keys, each key with itself included: ``key_a``, ``key_b`` (``key_a``
        comes first in key order, so ``m (m + 1) / 2`` rows), ``cka``, ``se``, ``batches``, ``images``. The
        matrix is symmetric: :meth:`matrix` gives it whole."""
        f, se = self.matrices()
        keys = self.keys or []
        i, j = np.triu_indices(len(keys))
        return pd.DataFrame({"key_a": pd.array([keys[a] for a in i], dtype="string"),
                             "key_b": pd.array([keys[b] for b in j], dtype="string"),
                             "cka": f[i, j], "se": se[i, j],
                             "batches": np.full(len(i), self.batches, dtype=np.int64),
                             "images": np.full(len(i), self.images, dtype=np.int64)})
