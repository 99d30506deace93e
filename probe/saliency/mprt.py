"""Efficient MPRT: the model-parameter randomisation test read as a rise in explanation complexity
(Hedström, Weber, Lapuschkin & Höhne 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
Parameter Randomisation Test", arXiv:2401.06465; published as "A Fresh Look at Sanity Checks for
Saliency Maps", xAI 2024; Quantus >= 0.5 ``quantus.EfficientMPRT``).

The complexity of a map is the discrete entropy (nats) of the histogram of its values in ``n_bins``
equal-width bins spanning the map's own [min, max] (the paper's H(Φ), n = 100 bins; Quantus's
``discrete_entropy``, i.e. ``np.histogram`` then ``scipy.stats.entropy``; a constant map falls into one
bin: entropy 0). The maps are used as the stage stores them (signed for the signed methods), as in
Quantus's default (``abs=False, normalise=False``). eMPRT compares two model states only, the
original and the *fully* randomised model:

    eMPRT = (H(map of randomised model) - H(map of original model)) / H(map of original model)

per image (undefined, NaN, where the original map is constant). A map that depends on the learned
weights turns into noise when they are randomised and its complexity rises (eMPRT > 0); a map that
does not change has eMPRT = 0. The fully randomised model is the last state of probe's cascading
randomisation (:mod:`probe.saliency.randomisation`: every layer with parameters re-initialised under
the same seeds), so eMPRT and the cascade's last step describe the same model.

Why Efficient rather than Smooth MPRT: sMPRT keeps the layer-by-layer similarity (Spearman / SSIM)
and averages noisy copies of the input to denoise it, which multiplies the attribution cost by the
number of samples and layers and keeps the similarity measures whose biases the criticisms are about
(e.g. rank correlations inflated by pixels that are 0 in every map). probe already reports the
cascading Spearman / SSIM test; eMPRT answers the criticisms with a different quantity (no pairwise
similarity, no layer order) for the price of one more attribution pass per method.

Statistics: per method, :func:`probe.uncertainty.paired_comparison` of the randomised against the
original complexity over images (effect > 0: the map depends on the weights), Holm-adjusted over the
methods of one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from probe.errors import NumericalError
from probe.saliency.randomisation import cascade_order, cascading_randomisations
from probe.uncertainty import adjust, paired_comparison

N_BINS = 100  # the paper's and Quantus's default


def explanation_complexity(maps: torch.Tensor | np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Discrete entropy (N,) in nats of each map's histogram: ``n_bins`` equal-width bins over the
    map's own [min, max] (numpy's binning: the last bin includes its right edge). ``maps`` (N, ...)."""
    if n_bins < 1:
        raise ValueError(f"n_bins: {n_bins} must be >= 1")
    a = np.asarray(maps.detach().cpu().double() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    a = a.reshape(len(a), -1)
    if not np.isfinite(a).all():
        raise ValueError("maps: NaN/Inf in an attribution map; its complexity is undefined")
    out = np.empty(len(a))
    for k, row in enumerate(a):
        counts = np.histogram(row, bins=n_bins)[0]
        p = counts[counts > 0] / counts.sum()
        out[k] = float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: -0.0 becomes 0.0
    return out


@dataclass(frozen=True)
class EfficientMPRT:
    """Per image (N,): complexity of the original and of the randomised map, and eMPRT (relative rise)."""

    complexity_original: np.ndarray
    complexity_randomised: np.ndarray
    rise: np.ndarray  # (H_rand - H_orig) / H_orig; NaN where H_orig == 0 (a constant original map)


def efficient_mprt(original: torch.Tensor | np.ndarray, randomised: torch.Tensor | np.ndarray,
                   n_bins: int = N_BINS) -> EfficientMPRT:
    """eMPRT per image from the maps (N, H, W) of the original and of the fully randomised model."""
    if tuple(original.shape) != tuple(randomised.shape):
        raise ValueError(f"randomised maps: shape {tuple(randomised.shape)} differs from the original maps' "
                         f"{tuple(original.shape)}")
    h0, h1 = explanation_complexity(original, n_bins), explanation_complexity(randomised, n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.where(h0 > 0, (h1 - h0) / np.where(h0 > 0, h0, 1.0), np.nan)
    return EfficientMPRT(h0, h1, rise)


def fully_randomised(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer that has parameters re-initialised: the last model of the
    cascading randomisation (:func:`probe.saliency.randomisation.cascading_randomisations`, same seeds).
    ``x``: one or more inputs (N, C, H, W), to find the executed layers."""
    layers = cascade_order(model, x)
    if not layers:
        raise ValueError("model: no layer with parameters and reset_parameters(); nothing to randomise")
    last = None
    for _step, _layer, m in cascading_randomisations(model, layers, seed):
        last = m
    return last


def mprt_table(model: nn.Module, x: torch.Tensor, maps: dict[str, torch.Tensor],
               compute: Callable[[str, nn.Module], torch.Tensor], image: Sequence[int], target_kind: Sequence[str],
               seed: int = 0, n_bins: int = N_BINS) -> pd.DataFrame:
    """eMPRT per method and map row.

    ``model``: the model the maps were computed on; ``maps``: method -> (M, H, W) original maps;
    ``compute(method, randomised_model)`` -> (M, H, W) the same method's maps on the randomised model
    (same images and targets); ``image`` / ``target_kind`` (M,) label the rows.
    Columns: method, item, image, target_kind, complexity_original, complexity_randomised, emprt, n_bins."""
    rmodel = fully_randomised(model, x, seed)
    frames = []
    for m, v in maps.items():
        rmap = compute(m, rmodel)
        if not torch.isfinite(rmap).all():
            raise NumericalError(f"saliency eMPRT: NaN/Inf in the maps of {m} on the randomised model")
        r = efficient_mprt(v, rmap, n_bins)
        frames.append(pd.DataFrame({
            "method": m, "item": np.arange(len(v)), "image": np.asarray(image), "target_kind": list(target_kind),
            "complexity_original": r.complexity_original, "complexity_randomised": r.complexity_randomised,
            "emprt": r.rise, "n_bins": n_bins}))
    return pd.concat(frames, ignore_index=True)


def mprt_summary(table: pd.DataFrame) -> dict[str, dict]:
    """Per method, over the rows with target_kind == "true": ``emprt_complexity_rise``, the paired
    comparison of randomised against original complexity (nats, Holm-adjusted over the methods), and
    ``emprt`` the mean relative rise over the rows where it is defined (None where none is)."""
    true = table[table.target_kind == "true"]
    methods = sorted(true.method.unique())
    groups = [true[true.method == m].sort_values("item") for m in methods]
    comps = adjust([paired_comparison(g.complexity_randomised.to_numpy(), g.complexity_original.to_numpy())
                    for g in groups])
    out = {}
    for m, g, c in zip(methods, groups, comps):
        rise = g.emprt.dropna()
        out[m] = {"emprt_complexity_rise": c.to_dict(), "emprt": None if rise.empty else float(rise.mean())}
    return out
