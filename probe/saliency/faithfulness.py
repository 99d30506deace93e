"""Deletion and insertion curves, their AUC (RISE, Petsiuk et al. 2018, section 4.1), and the comparison of a
method's pixel order with a null distribution of random orders, batched.

The AUC convention (the only one probe uses): pixels are taken in order of attribution, highest
first, in ``steps`` equal steps (step k affects the first ``floor(k * H * W / steps)`` pixels, all
channels; ties in the map: lower pixel index first). Deletion replaces them with the substrate;
insertion starts from the substrate and puts the original pixels back. At every step the score is
the softmax *probability* of the target class (the softmax of the model's logits: attributions are
of the logit, see :mod:`probe.saliency.prepare`, but the curves score the probability, as RISE
does). The AUC is the trapezoid rule over the fraction of pixels affected, x = k / steps in [0, 1],
so it lies in [0, 1] whatever ``steps`` is (RISE's reference implementation: ``(sum - first/2 -
last/2) / (len - 1)``; not Quantus' PixelFlipping, which sums over steps and grows with their
number). A low deletion AUC and a high insertion AUC mean faithful. RISE scores the class
predicted on the whole image; probe scores each row's target (the true class, and the predicted
class again for misclassified images).

Chance: ``R`` random pixel orders per image (:func:`random_orders`, seeded), scored the same way. The
method is compared with chance over the images by :func:`versus_random`: effect = mean over images
of (method AUC - the image's mean AUC over the R random orders), its 95% t interval and the
two-sided sign-flip permutation p-value (:func:`probe.uncertainty.paired_comparison`). The stage
Holm-adjusts the p-values over its family (every method x {deletion, insertion}).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from probe.saliency.batching import map_batches
from probe.saliency.road import DEFAULT_FRACTIONS, road_auc, road_curves
from probe.uncertainty import Comparison, paired_comparison

ORDER_CHUNK_ELEMENTS = 1 << 23  # random orders are scored in chunks of at most this many (order x pixel) ranks


def attribution_order(maps: torch.Tensor) -> torch.Tensor:
    """Pixel indices (N, H*W) sorted by attribution, highest first (ties: lower index first)."""
    return torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)


def random_order(n: int, pixels: int, seed: int) -> torch.Tensor:
    """A seeded random pixel order per image (N, H*W)."""
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n, pixels, generator=g), dim=1)


def order_seed(seed: int, r: int) -> int:
    """The seed of random order ``r`` (0-based) of a run with ``seed``: distinct streams for distinct (seed, r)."""
    return (int(seed) * 1_000_003 + int(r)) % (2 ** 63)


def random_orders(n: int, pixels: int, orders: int, seed: int) -> torch.Tensor:
    """``orders`` seeded random pixel orders per image, (orders, N, H*W); order r is
    ``random_order(n, pixels, order_seed(seed, r))`` whatever ``orders`` is."""
    return torch.stack([random_order(n, pixels, order_seed(seed, r)) for r in range(orders)])


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """rank[n, p] = position of pixel p in image n's order."""
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


@torch.no_grad()
def perturbation_curves(model: nn.Module, x: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                        substrate: torch.Tensor, steps: int, mode: str, batch_size: int = 512,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """Target-class probability (K, steps + 1) as pixels are deleted (``mode='deletion'``) from ``x`` into
    ``substrate``, or inserted (``'insertion'``) from ``x`` into ``substrate``; both (N, C, H, W).

    ``order`` (K, H*W): one pixel order per curve, for image ``rows[k]`` (default: K = N, row k is image k).
    ``model`` returns logits (or log-probabilities: the softmax of either is the probability). All
    (curve, step) pairs are evaluated in batches of ``batch_size`` perturbed images.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode: '{mode}' is not allowed; allowed: deletion, insertion")
    n, c, h, w = x.shape
    pixels = h * w
    rows = torch.arange(n, device=x.device) if rows is None else rows.to(x.device)
    k_curves = len(order)
    if len(rows) != k_curves:
        raise ValueError(f"perturbation_curves: {k_curves} orders for {len(rows)} rows")
    ranks = _ranks(order.to(x.device)).view(k_curves, 1, h, w)
    counts = torch.arange(steps + 1, device=x.device) * pixels // steps  # pixels affected at each step
    first, second = (substrate, x) if mode == "deletion" else (x, substrate)
    target = target.to(x.device)

    def score(lo: int, hi: int) -> torch.Tensor:
        flat = torch.arange(lo, hi, device=x.device)
        curve, k = flat // (steps + 1), flat % (steps + 1)
        img = rows[curve]
        affected = ranks[curve] < counts[k].view(-1, 1, 1, 1)  # (B, 1, H, W)
        xs = torch.where(affected, first[img], second[img])
        prob = torch.softmax(model(xs).float(), dim=1)
        return prob.gather(1, target[img].view(-1, 1).to(prob.device)).squeeze(1)

    return map_batches(score, k_curves * (steps + 1), batch_size, what="deletion/insertion").view(k_curves, steps + 1)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area (K,) under curves (K, steps + 1) sampled evenly on [0, 1]: the RISE convention."""
    steps = curve.shape[1] - 1
    return (curve[:, :-1] + curve[:, 1:]).sum(1) / (2 * steps)


def deletion_insertion_auc(model: nn.Module, x: torch.Tensor, target: torch.Tensor, order: torch.Tensor,
                           substrate: torch.Tensor, steps: int, batch_size: int = 512,
                           rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion AUC (K,), insertion AUC (K,)) for pixel ``order`` (K, H*W) of images ``rows`` (default: K = N)."""
    d = perturbation_curves(model, x, target, order, substrate, steps, "deletion", batch_size, rows)
    i = perturbation_curves(model, x, target, order, substrate, steps, "insertion", batch_size, rows)
    return auc(d), auc(i)


def random_order_aucs(model: nn.Module, x: torch.Tensor, target: torch.Tensor, substrate: torch.Tensor, steps: int,
                      orders: int, seed: int, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion AUC, insertion AUC), each (orders, N): every image under each of ``orders`` seeded random
    pixel orders (:func:`random_orders`). The orders of several images share forward passes; they are
    scored in chunks of whole orders of at most :data:`ORDER_CHUNK_ELEMENTS` ranks."""
    if orders < 1:
        raise ValueError(f"random_order_aucs: orders must be >= 1 (got {orders})")
    n = len(x)
    pixels = x.shape[-2] * x.shape[-1]
    per_chunk = max(1, ORDER_CHUNK_ELEMENTS // (n * pixels))
    dels, inss = [], []
    for lo in range(0, orders, per_chunk):
        hi = min(orders, lo + per_chunk)
        order = torch.stack([random_order(n, pixels, order_seed(seed, r)) for r in range(lo, hi)]).flatten(0, 1)
        rows = torch.arange(n).repeat(hi - lo)
        d, i = deletion_insertion_auc(model, x, target, order, substrate, steps, batch_size, rows)
        dels.append(d.view(hi - lo, n))
        inss.append(i.view(hi - lo, n))
    return torch.cat(dels), torch.cat(inss)


def versus_random(method_auc, random_auc) -> Comparison:
    """Paired comparison over images of a method's AUC (N,) with each image's mean AUC over its random orders
    (orders, N): effect = mean(method - random mean), t interval, sign-flip permutation p (unadjusted)."""
    method_auc = np.asarray(method_auc, dtype=np.float64)
    random_auc = np.asarray(random_auc, dtype=np.float64)
    if random_auc.ndim != 2 or random_auc.shape[1] != len(method_auc):
        raise ValueError(f"versus_random: random AUCs must be (orders, {len(method_auc)}); got {random_auc.shape}")
    return paired_comparison(method_auc, random_auc.mean(0))


def verdict(c: Comparison, metric: str, alpha: float = 0.05) -> str:
    """'better than random', 'worse than random' or 'not distinguishable from random' for ``metric``
    ('deletion': lower is better; 'insertion': higher is better), from the (adjusted) p-value."""
    if not c.distinguishable(alpha):
        return "not distinguishable from random"
    better = c.effect < 0 if metric == "deletion" else c.effect > 0
    return "better than random" if better else "worse than random"


def faithfulness_metrics(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, maps: torch.Tensor, *,
                         substrate: torch.Tensor | None = None, steps: int = 16,
                         fractions: Sequence[float] | None = None, noise_std: float = 0.01, seed: int = 0,
                         batch_size: int = 512) -> pd.DataFrame:
    """How faithful attribution ``maps`` (N, H, W) of images ``x`` (N, C, H, W) are to ``model``, per image.

    One row per image: ``deletion_auc`` (lower is better) and ``insertion_auc`` (higher is better), the RISE
    curves of :func:`deletion_insertion_auc` with ``steps`` steps and pixels going to / coming from
    ``substrate`` (default zeros in ``x``'s units: pass the normalised black image for RISE's black), and
    ROAD's ``road_morf_auc`` (lower is better) and ``road_lerf_auc`` (higher is better) over ``fractions``
    (default :data:`probe.saliency.road.DEFAULT_FRACTIONS`) with imputation noise ``noise_std`` in ``x``'s units
    (:func:`probe.saliency.road.road_curves`). Every score is the softmax probability of ``target`` (N,) (or
    one class for all). To compare with chance, score random orders the same way (:func:`random_order_aucs`).
    """
    target = torch.as_tensor(target, device=x.device).long().expand(len(x))
    substrate = torch.zeros_like(x) if substrate is None else substrate
    fractions = list(DEFAULT_FRACTIONS if fractions is None else fractions)
    d, i = deletion_insertion_auc(model, x, target, attribution_order(maps.to(x.device)), substrate, steps, batch_size)
    road = {o: road_auc(road_curves(model, x, target, maps, fractions, o, noise_std, seed, batch_size), fractions)
            for o in ("morf", "lerf")}
    return pd.DataFrame({"target": target.cpu().numpy(), "deletion_auc": d.cpu().double().numpy(),
                         "insertion_auc": i.cpu().double().numpy(), "road_morf_auc": road["morf"],
                         "road_lerf_auc": road["lerf"]})
