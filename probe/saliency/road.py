"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci 2022, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods", ICML), batched over images.

A fraction of an image's pixels is removed in the order of its attribution map and filled in by
*noisy linear imputation* (sections 4-5 of the paper; ``NoisyLinearImputer`` in their reference code,
github.com/tleemann/road_evaluation, ``road/imputations.py``, and Quantus's ``noisy_linear_imputation``):
each removed pixel becomes the weighted average of its 8 neighbours, weight 1/6 for the 4 direct and
1/12 for the 4 diagonal ones (neighbours outside the image are left out and the weights that remain
renormalised), where the neighbours may themselves be removed. That is one sparse linear system per
image, the same matrix for every channel; here the systems of all images form one block-diagonal
system, factorised once and solved for all channels. Gaussian noise of standard deviation
``noise_std`` (in the units of ``x``; the paper and Quantus use 0.01 on [0, 1] pixels) is then added to
the imputed pixels only. Because every row of weights sums to one, the imputation commutes with a
per-channel affine normalisation: imputing the normalised input equals normalising the imputed pixels,
with the noise divided by the channel's std.

Orders: ``morf`` removes the most relevant pixels first (highest attribution), ``lerf`` the least
relevant first. In both, ``fraction`` is the share of pixels *removed*: the first
``floor(fraction * H * W)`` pixels of the order. (The reference code's ``remove=False, th_p=p`` keeps
the top ``p`` and removes the rest, i.e. LeRF at fraction ``1 - p`` here.) Ties in a map are broken
uniformly at random (seeded), as the reference code does by adding 1e-4 noise to the normalised map.

Score: the softmax probability of the target class (as :mod:`probe.saliency.faithfulness`; the paper's
``road_eval`` reports it beside accuracy), or ``score="accuracy"`` (argmax equals the target, the
quantity Quantus's ``ROAD`` averages). AUC: the trapezoid area over the fraction axis divided by the
span of the fractions (largest minus smallest), i.e. the curve's mean height over the fractions
evaluated, in [0, 1]. A faithful map has a low MoRF AUC and a high LeRF AUC: the comparison reported is
the paired difference LeRF AUC - MoRF AUC over images (:func:`probe.uncertainty.paired_comparison`,
Holm-adjusted over the methods of one run), > 0 for a faithful map.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from scipy.linalg import solveh_banded
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import splu
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from probe.saliency.batching import map_batches
from probe.uncertainty import adjust, paired_comparison

ORDERS = ("morf", "lerf")
SCORES = ("probability", "accuracy")
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# (row offset, column offset) -> weight, the reference code's ``neighbors_weights``; they sum to 1
NEIGHBOUR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                     ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def check_fractions(fractions: Sequence[float], key: str = "fractions") -> list[float]:
    """The fractions as floats; raises ValueError unless non-empty, strictly increasing and in [0, 1)."""
    f = [float(v) for v in fractions]
    if not f:
        raise ValueError(f"{key}: empty; give at least one fraction of pixels to remove, in [0, 1)")
    bad = [v for v in f if not (0.0 <= v < 1.0)]
    if bad:
        # removing every pixel leaves nothing to impute from (the linear system is singular)
        raise ValueError(f"{key}: {bad} out of range; each fraction must be in [0, 1)")
    if any(b <= a for a, b in zip(f, f[1:])):
        raise ValueError(f"{key}: {f} must be strictly increasing")
    return f


def removed_count(fraction: float, pixels: int) -> int:
    """How many pixels a fraction removes: ``floor(fraction * pixels)`` (1e-9 absorbs 0.29 * 100 = 28.999...)."""
    return int(math.floor(fraction * pixels + 1e-9))


def removal_order(maps: torch.Tensor | np.ndarray, order: str, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Pixel indices (N, H*W), the first removed first: ``morf`` highest attribution first, ``lerf``
    lowest first; ties in random order (seeded). ``maps`` (N, H, W)."""
    if order not in ORDERS:
        raise ValueError(f"order: '{order}' is not allowed; allowed: {', '.join(ORDERS)}")
    a = np.asarray(maps.detach().cpu().double() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    a = a.reshape(len(a), -1)
    if not np.isfinite(a).all():
        raise ValueError("maps: NaN/Inf in an attribution map; ROAD needs finite maps")
    key = -a if order == "morf" else a
    tie = np.random.default_rng(seed).random(a.shape)
    return np.lexsort((tie, key), axis=1)  # sort by key, then by the random tie-breaker


def removal_masks(order_idx: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """Boolean masks (N, H, W), True where one of the first ``count`` pixels of each row of ``order_idx``."""
    n, pixels = order_idx.shape
    if pixels != height * width:
        raise ValueError(f"order has {pixels} pixels per image; H*W = {height}x{width} = {height * width}")
    masks = np.zeros((n, pixels), dtype=bool)
    np.put_along_axis(masks, order_idx[:, :count], True, axis=1)
    return masks.reshape(n, height, width)


def _channel_noise(noise_std: float | Sequence[float], channels: int) -> np.ndarray:
    s = np.atleast_1d(np.asarray(noise_std, dtype=np.float64))
    if s.size == 1:
        s = np.full(channels, float(s[0]))
    if s.shape != (channels,) or not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"noise_std: {noise_std} must be one number >= 0 or one per channel ({channels})")
    return s


def noisy_linear_imputation(x: np.ndarray | torch.Tensor, removed: np.ndarray, noise_std: float | Sequence[float] = 0.01,
                            rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Images (N, C, H, W) float64 with the pixels where ``removed`` (N, H, W) is True replaced by noisy
    linear imputation (module docstring); the other pixels are returned unchanged.

    ``noise_std``: one standard deviation or one per channel, in the units of ``x``; 0 gives the
    noiseless imputation. Raises ValueError where an image has every pixel removed."""
    x = np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {x.shape}")
    n, c, h, w = x.shape
    removed = np.asarray(removed, dtype=bool)
    if removed.shape != (n, h, w):
        raise ValueError(f"removed: expected shape {(n, h, w)}, got {removed.shape}")
    full = removed.reshape(n, -1).all(1)
    if full.any():
        raise ValueError(f"removed: every pixel removed in images {np.flatnonzero(full).tolist()}; nothing to impute from")
    sigma = _channel_noise(noise_std, c)
    out = x.copy()
    img, row, col = np.nonzero(removed)
    u = len(img)
    if u == 0:
        return out
    var = np.full((n, h, w), -1, dtype=np.int64)
    var[img, row, col] = np.arange(u)  # unknown number of each removed pixel

    # L v = r with L = diag(sum of in-image neighbour weights) - W(removed neighbours), r = W(kept neighbours) x
    rows, cols, vals = [], [], []  # off-diagonal entries
    diag = np.zeros(u)
    rhs = np.zeros((u, c))
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
        ny, nx = row + dy, col + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[inside] += weight
        i, ni, ny, nx = np.flatnonzero(inside), img[inside], ny[inside], nx[inside]
        nb = var[ni, ny, nx]
        unknown = nb >= 0
        rows.append(i[unknown])
        cols.append(nb[unknown])
        vals.append(np.full(int(unknown.sum()), -weight))
        known = ~unknown
        rhs[i[known]] += weight * x[ni[known], :, ny[known], nx[known]]
    values = _solve_spd(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), diag, rhs, w)
    if (sigma > 0).any():
        rng = rng if rng is not None else np.random.default_rng(0)
        values = values + rng.standard_normal(values.shape) * sigma
    out[img, :, row, col] = values
    return out


BANDED_MAX_WIDTH = 64  # up to this image width the banded Cholesky beats SuperLU (bandwidth <= W + 1)


def _solve_spd(i: np.ndarray, j: np.ndarray, off: np.ndarray, diag: np.ndarray, rhs: np.ndarray,
               width: int) -> np.ndarray:
    """Solve L v = rhs for L = diag(diag) + off-diagonal entries (i, j, off), symmetric positive definite.

    Unknowns are numbered in raster order, so an entry links unknowns at most ``width + 1`` apart: a
    banded Cholesky (LAPACK pbsv) costs U * bandwidth^2; SuperLU's fill-reducing factorisation wins on
    wide images. L is positive definite: symmetric, weakly diagonally dominant, and strictly so in at
    least one row of every connected group of removed pixels (as long as one pixel is kept)."""
    u = len(diag)
    band = int((j - i).max()) if len(i) else 0
    if width <= BANDED_MAX_WIDTH:
        ab = np.zeros((band + 1, u))  # upper form: ab[band + r - c, c] = L[r, c] for r <= c
        ab[band] = diag
        up = j > i
        ab[band + i[up] - j[up], j[up]] = off[up]
        # a band this narrow gains nothing from BLAS threads; on a busy machine their spinning cost 10x
        with threadpool_limits(1, user_api="blas"):
            return solveh_banded(ab, rhs, lower=False, check_finite=False)
    a = csc_matrix((np.concatenate([diag, off]), (np.concatenate([np.arange(u), i]), np.concatenate([np.arange(u), j]))),
                   shape=(u, u))
    return splu(a).solve(rhs)


@torch.no_grad()
def _scores(model: nn.Module, xs: torch.Tensor, target: torch.Tensor, score: str, batch_size: int) -> torch.Tensor:
    def chunk(lo: int, hi: int) -> torch.Tensor:
        out = model(xs[lo:hi]).float()
        t = target[lo:hi].view(-1, 1).to(out.device)
        if score == "accuracy":
            return (out.argmax(1, keepdim=True) == t).squeeze(1).double().cpu()
        return torch.softmax(out, dim=1).gather(1, t).squeeze(1).double().cpu()

    return map_batches(chunk, len(xs), batch_size, what="road")


def road_curves(model: nn.Module, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor,
                fractions: Sequence[float] = DEFAULT_FRACTIONS, order: str = "morf",
                noise_std: float | Sequence[float] = 0.01, seed: int = 0, batch_size: int = 512,
                score: str = "probability") -> torch.Tensor:
    """ROAD curves (N, len(fractions)) float64: the target's score after removing each fraction of the
    pixels of ``x`` (N, C, H, W) in ``order`` of ``maps`` (N, H, W) by noisy linear imputation.

    ``target`` (N,) class indices; ``noise_std`` in the units of ``x`` (one value or one per channel);
    ``seed`` fixes the tie-breaking and the noise; ``batch_size`` perturbed images per forward pass;
    ``score``: ``probability`` (softmax of the model's output at the target) or ``accuracy``.

    Example::

        morf = road_curves(model, x, y, maps, order="morf")
        lerf = road_curves(model, x, y, maps, order="lerf")
        paired_comparison(road_auc(lerf), road_auc(morf))  # > 0 for a faithful map
    """
    if score not in SCORES:
        raise ValueError(f"score: '{score}' is not allowed; allowed: {', '.join(SCORES)}")
    f = check_fractions(fractions)
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if tuple(maps.shape) != (n, h, w):
        raise ValueError(f"maps: expected shape {(n, h, w)} (one map per image), got {tuple(maps.shape)}")
    if tuple(target.shape) != (n,):
        raise ValueError(f"target: expected shape {(n,)}, got {tuple(target.shape)}")
    tie_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)  # independent streams for ties and noise
    idx = removal_order(maps, order, tie_seed)
    rng = np.random.default_rng(noise_seed)
    x64 = x.detach().cpu().double().numpy()
    # every fraction's copies of the images in one block-diagonal system: (F * N, C, H, W), fraction-major
    masks = np.concatenate([removal_masks(idx, removed_count(fr, h * w), h, w) for fr in f])
    perturbed = noisy_linear_imputation(np.tile(x64, (len(f), 1, 1, 1)), masks, noise_std, rng)
    xs = torch.from_numpy(perturbed).to(dtype=x.dtype, device=x.device)
    scores = _scores(model, xs, target.repeat(len(f)), score, batch_size)
    return scores.view(len(f), n).T.contiguous()


def road_auc(curves: torch.Tensor | np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Area (N,) under curves (N, F) over ``fractions``, divided by their span: the mean height in [0, 1]
    (with one fraction, the curve's single value)."""
    f = np.asarray(check_fractions(fractions))
    c = np.asarray(curves.cpu() if isinstance(curves, torch.Tensor) else curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(f):
        raise ValueError(f"curves: expected (N, {len(f)}), got shape {c.shape}")
    if len(f) == 1:
        return c[:, 0].copy()
    return ((c[:, 1:] + c[:, :-1]) / 2 * np.diff(f)).sum(1) / (f[-1] - f[0])


def road_table(model: nn.Module, x: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
               image: Sequence[int], target_kind: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
               noise_std: float | Sequence[float] = 0.01, seed: int = 0, batch_size: int = 512) -> pd.DataFrame:
    """One row per method and map row: MoRF and LeRF curves (lists over ``fractions``) and their AUCs.

    Columns: method, item, image, target_kind, target, road_fractions, road_morf_curve, road_lerf_curve,
    road_morf_auc, road_lerf_auc. ``image`` / ``target_kind`` (M,) label the rows of ``x`` (M, C, H, W);
    the same seed (tie-breaks and noise) is used for every method, so methods see the same noise."""
    f = check_fractions(fractions)
    frames = []
    for m, v in maps.items():
        curves = {o: road_curves(model, x, target, v, f, o, noise_std, seed, batch_size) for o in ORDERS}
        frames.append(pd.DataFrame({
            "method": m, "item": np.arange(len(x)), "image": np.asarray(image), "target_kind": list(target_kind),
            "target": target.cpu().numpy(), "road_fractions": [f] * len(x),
            **{f"road_{o}_curve": list(curves[o].numpy()) for o in ORDERS},
            **{f"road_{o}_auc": road_auc(curves[o], f) for o in ORDERS}}))
    return pd.concat(frames, ignore_index=True)


def road_summary(table: pd.DataFrame) -> dict[str, dict]:
    """Per method, over the rows with target_kind == "true": mean MoRF and LeRF AUC and the paired
    comparison LeRF - MoRF (Holm-adjusted over the methods) as ``Comparison.to_dict()``."""
    true = table[table.target_kind == "true"]
    methods = sorted(true.method.unique())
    comps = adjust([_lerf_vs_morf(true[true.method == m]) for m in methods])
    return {m: {"road_morf_auc": float(true[true.method == m].road_morf_auc.mean()),
                "road_lerf_auc": float(true[true.method == m].road_lerf_auc.mean()),
                "road_lerf_vs_morf": c.to_dict()} for m, c in zip(methods, comps)}


def _lerf_vs_morf(g: pd.DataFrame):
    g = g.sort_values("item")
    return paired_comparison(g.road_lerf_auc.to_numpy(), g.road_morf_auc.to_numpy())
