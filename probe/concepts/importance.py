"""How much a class score depends on each concept: total Sobol indices of concept masks.

CRAFT (Fel et al., "CRAFT: Concept Recursive Activation FacTorization for Explainability", CVPR 2023,
arXiv:2211.10154), Sec. 3.2. With activations ``A ~ U W`` (:mod:`probe.concepts.factorise`), the
coefficients of an image are perturbed by random masks ``M`` in ``[0, 1]^k``, one value per concept
(``U * M``), the activations are rebuilt as ``(U * M) W`` and passed through the rest of the network
(the "head", :func:`head_from_layer`); the importance of concept ``i`` is the total Sobol index of ``M_i``
for the class score: the share of the score's variance that involves ``M_i``, alone or with others.

- :func:`sobol_design`: the quasi-Monte Carlo masks; :func:`jansen_total`: the estimator.
- :func:`sobol_importance`: both, batched over images and designs, averaged per class.
- :func:`head_from_layer`: the head of a model after a named layer, as a callable.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import qmc

from probe.errors import ConfigError, NumericalError
from probe.hooks import check_layers
from probe.models.head import scores_model

EPS = 1e-12  # floor of the output variance, as Xplique's


def sobol_design(k: int, n_designs: int = 32, seed: int = 0) -> np.ndarray:
    """The masks of the replicated design (Saltelli 2002; Xplique's ``ScipySobolSequenceRS``, scrambled here).

    ``n_designs`` points of a scrambled Sobol' sequence in ``2k`` dimensions (``scipy.stats.qmc.Sobol``, seeded
    with ``seed``) give ``A`` (the first ``k`` coordinates) and ``B`` (the last ``k``), both ``(n_designs, k)``
    in ``[0, 1)``; ``C_i`` is ``A`` with its column ``i`` taken from ``B``. Returns ``[A; C_0; ...; C_{k-1}]``
    ``(n_designs * (k + 1), k)`` float64: the Jansen estimator does not use the outputs at ``B`` itself.
    ``n_designs`` must be a power of two >= 2 (the Sobol' sequence is balanced only then).
    """
    if int(k) != k or k < 1:
        raise ConfigError(f"k: {k} is not allowed; must be an integer >= 1")
    if int(n_designs) != n_designs or n_designs < 2 or int(n_designs) & (int(n_designs) - 1):
        raise ConfigError(f"n_designs: {n_designs} is not allowed; must be a power of two >= 2 (e.g. 32)")
    k, n = int(k), int(n_designs)
    try:
        sampler = qmc.Sobol(2 * k, scramble=True, rng=seed)
    except TypeError:  # scipy < 1.15
        sampler = qmc.Sobol(2 * k, scramble=True, seed=seed)
    ab = sampler.random(n)
    a, b = ab[:, :k], ab[:, k:]
    c = np.repeat(a[None], k, axis=0)  # (k, n, k)
    c[np.arange(k), :, np.arange(k)] = b.T
    return np.concatenate([a, c.reshape(k * n, k)])


def jansen_total(y: np.ndarray, n_designs: int, k: int) -> np.ndarray:
    """Jansen's (1999) estimator of the total Sobol indices from the outputs ``y`` ``(..., n_designs * (k + 1))``
    at the masks of :func:`sobol_design`, in that order (so ``y_A`` first, then ``y_{C_0}``, ...):

        ``S_Ti = sum_j (y_A[j] - y_{C_i}[j])^2 / (2 n_designs Var(y_A))``,

    ``Var`` the unbiased sample variance (``ddof=1``) of ``y_A``, floored at ``1e-12`` (an output that does not
    vary gets indices 0), as Xplique's ``JansenEstimator``. Returns ``(..., k)``.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.shape[-1] != n_designs * (k + 1):
        raise ConfigError(f"y: last dimension {y.shape[-1]} is not n_designs * (k + 1) = {n_designs * (k + 1)}")
    y_a = y[..., :n_designs]
    y_c = y[..., n_designs:].reshape(*y.shape[:-1], k, n_designs)
    var = np.maximum(y_a.var(axis=-1, ddof=1), EPS)
    return ((y_a[..., None, :] - y_c) ** 2).sum(-1) / (2 * n_designs * var[..., None])


@torch.no_grad()
def sobol_importance(head: Callable[[torch.Tensor], torch.Tensor], U: torch.Tensor, W: torch.Tensor,
                     classes: int | Sequence[int] | torch.Tensor, n_designs: int = 32, seed: int = 0, *,
                     spatial: tuple[int, int] | None = None, batch_size: int = 256,
                     per_image: bool = False) -> np.ndarray:
    """Total Sobol index of each concept for each image's class score (CRAFT Sec. 3.2), averaged per class.

    ``U``: the concept coefficients of ``N`` images, ``(N, k)`` (pooled activations) or ``(N, P, k)`` (every
    position of a map, ``P = H * W`` in row-major order, :meth:`Concepts.transform_maps`); ``W`` ``(k, C)``.
    ``head``: activations -> class scores ``(n, classes)``; it receives ``(n, C)`` for 2-D ``U`` and
    ``(n, C, H, W)`` for 3-D ``U``, with ``spatial=(H, W)`` required then. ``classes``: the class whose score is
    explained, one per image, or one int for all.

    Sampling: :func:`sobol_design` (scrambled Sobol' sequence, ``seed``), ``n_designs * (k + 1)`` masks per
    image; mask ``m`` ``(k,)`` multiplies concept ``i``'s coefficient at every position of the image by ``m_i``
    (CRAFT's perturbation, with Xplique's one-mask-per-concept-per-image for maps), the activations
    ``(U * m) @ W`` go through ``head``, and the image's class score is kept. Estimator: :func:`jansen_total`
    per image. ``head`` sees at most ``batch_size`` perturbed images at a time, float32 on ``U``'s device,
    under ``torch.no_grad``.

    Returns ``(m, k)`` float64: row ``r`` is the mean over the images of class ``sorted(set(classes))[r]``;
    with ``per_image=True``, the ``(N, k)`` indices of each image instead (CRAFT's local importance).
    """
    U = torch.as_tensor(U).float()
    W = torch.as_tensor(W).to(device=U.device, dtype=torch.float32)
    if U.ndim not in (2, 3) or U.shape[0] == 0:
        raise ConfigError(f"U: shape {tuple(U.shape)} is not allowed; must be (N, k) or (N, P, k) with N >= 1")
    if W.ndim != 2 or W.shape[0] != U.shape[-1]:
        raise ConfigError(f"W: shape {tuple(W.shape)} is not allowed; must be (k, C) with k = {U.shape[-1]} "
                          f"(the last dimension of U)")
    N, k = U.shape[0], U.shape[-1]
    maps = U.ndim == 3
    if maps and (spatial is None or len(spatial) != 2 or spatial[0] * spatial[1] != U.shape[1]):
        raise ConfigError(f"spatial: {spatial} is not allowed; for U of shape {tuple(U.shape)} it must be "
                          f"(H, W) with H * W = {U.shape[1]}")
    cls = torch.as_tensor(classes, dtype=torch.long).reshape(-1).cpu()
    if cls.numel() == 1:
        cls = cls.expand(N)
    if cls.numel() != N:
        raise ConfigError(f"classes: {cls.numel()} values given for {N} images; give one per image or one int")
    if (cls < 0).any():
        raise ConfigError(f"classes: {int(cls.min())} is not allowed; must be >= 0")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size: {batch_size} is not allowed; must be >= 1")

    masks = torch.from_numpy(sobol_design(k, n_designs, seed)).to(device=U.device, dtype=U.dtype)
    R = len(masks)
    U3 = U if maps else U[:, None, :]  # (N, P, k)
    y = np.empty(N * R)
    for start in range(0, N * R, int(batch_size)):
        flat = torch.arange(start, min(start + int(batch_size), N * R))
        img, des = flat // R, flat % R
        acts = (U3[img.to(U.device)] * masks[des.to(U.device)][:, None, :]) @ W  # (b, P, C)
        if maps:
            acts = acts.reshape(len(flat), spatial[0], spatial[1], -1).permute(0, 3, 1, 2).contiguous()
        else:
            acts = acts[:, 0]
        scores = head(acts)
        if scores.ndim != 2 or scores.shape[0] != len(flat):
            raise ConfigError(f"head: returned shape {tuple(scores.shape)} for {len(flat)} inputs; must be "
                              f"({len(flat)}, classes)")
        if int(cls.max()) >= scores.shape[1]:
            raise ConfigError(f"classes: {int(cls.max())} is out of range; the head gives {scores.shape[1]} scores")
        picked = scores[torch.arange(len(flat)), cls[img].to(scores.device)].double().cpu().numpy()
        if not np.isfinite(picked).all():
            raise NumericalError("head: class scores contain NaN or Inf")
        y[start : start + len(flat)] = picked
    st = jansen_total(y.reshape(N, R), int(n_designs), k)  # (N, k)
    if per_image:
        return st
    cls_np = cls.numpy()
    return np.stack([st[cls_np == c].mean(0) for c in np.unique(cls_np)])


def head_from_layer(model: nn.Module, layer: str, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The part of ``model`` after ``layer``, as a callable ``acts -> class scores``: the logits, before a final
    (log-)softmax (:func:`probe.models.head.scores_model`), as every score probe explains. A log-probability near 0
    barely varies under the masks, and the ratio of Jansen's estimator becomes unstable (indices far above 1).

    Calling it runs ``model`` on ``example`` with a forward hook on ``model.get_submodule(layer)`` that returns
    (a clone of) ``acts`` in place of the layer's output, so everything after the layer sees ``acts``.
    ``example`` (a batch of 1, expanded to ``len(acts)``, or of ``len(acts)`` inputs) only fixes the input
    shape and what runs before the layer: that part runs on every call and its result at ``layer`` is
    overwritten. Anything that reaches the output without going through ``layer`` (a residual branch that
    skips it) still sees ``example``: for a head that depends on ``acts`` alone, pick a layer every path to the
    output passes through (a block's or stage's output). ``acts`` must have the layer's output shape, and the
    layer must run once per forward pass (not a shared module, like a ResNet block's ``relu``). Put the model
    in eval mode first (batch norm statistics). Gradients flow to ``acts`` unless called under no_grad.

    Raises :class:`probe.errors.LayerNotFound` naming ``layer``, the closest name and the valid ones.
    """
    check_layers(model, [layer], key="layer")
    example = torch.as_tensor(example)
    model = scores_model(model, example[:1])
    module = model.get_submodule(layer)

    def head(acts: torch.Tensor) -> torch.Tensor:
        n = acts.shape[0]
        if example.shape[0] == 1:
            x = example.expand(n, *example.shape[1:])
        elif example.shape[0] == n:
            x = example
        else:
            raise ConfigError(f"example: batch of {example.shape[0]} for {n} activations; must be 1 or {n}")
        calls = []

        def replace(_module, _inputs, output):
            calls.append(1)
            if len(calls) > 1:
                raise ConfigError(f"layer: '{layer}' runs more than once per forward pass (a shared module); "
                                  f"pick a layer that runs once")
            if not isinstance(output, torch.Tensor) or output.shape != acts.shape:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ConfigError(f"acts: shape {tuple(acts.shape)} does not match layer '{layer}' output {shape}")
            return acts.to(device=output.device, dtype=output.dtype).clone()  # a later in-place op must not edit acts

        handle = module.register_forward_hook(replace)
        try:
            return model(x)
        finally:
            handle.remove()

    return head
