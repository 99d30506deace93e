"""Judging synthetic images, not just showing them: saturation, and whether other models recognise a class image.

``saturation`` flags degenerate images (near-uniform black or white squares, clipped blobs). ``transfer``
asks other trained models what a model's class images show: an image that only the model that made it
calls a "3" is an adversarial pattern, not what the network thinks a 3 looks like.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from probe.synthesis.render import Normalize, frozen

SATURATION_TOLERANCE = 0.02  # a value within 2% of the ends of [0, 1] counts as clipped


def saturation(pixels: torch.Tensor | np.ndarray, tolerance: float = SATURATION_TOLERANCE) -> np.ndarray:
    """The fraction of each image's values (pixels x channels) within ``tolerance`` of 0 or 1: ``(N,)``
    for pixels ``(N, C, H, W)`` in [0, 1]."""
    x = np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1)
    return ((x <= tolerance) | (x >= 1 - tolerance)).mean(1)


def saturation_limit(dataset_saturation: np.ndarray, quantile: float = 0.99) -> float:
    """The saturation above which an image counts as saturated: the ``quantile`` of the training images' own
    saturation, so that a dataset of black-background digits (mostly 0 already) is not called saturated, and
    never below 0.5 (more than half of an image clipped is degenerate whatever the data)."""
    return float(max(0.5, np.quantile(np.asarray(dataset_saturation, dtype=np.float64), quantile)))


def predict(model: nn.Module, pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
            batch_size: int = 256) -> torch.Tensor:
    """Class probabilities ``(N, classes)`` (float64) that ``model`` gives ``pixels`` ``(N, C, H, W)`` in [0, 1],
    normalised with the model's own ``mean``/``std``. The model's output is taken as logits, or as
    (log-)probabilities where it already sums to 1 after exp (a final softmax or log-softmax)."""
    norm = Normalize(mean, std)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), frozen(model):
        for start in range(0, len(pixels), batch_size):
            y = model(norm(pixels[start:start + batch_size].to(device))).double().cpu()
            out.append(y)
    y = torch.cat(out)
    if torch.allclose(y.sum(1), torch.ones(len(y), dtype=y.dtype), atol=1e-4) and bool((y >= 0).all()):
        return y
    if torch.allclose(y.exp().sum(1), torch.ones(len(y), dtype=y.dtype), atol=1e-4):
        return y.exp()
    return torch.softmax(y, dim=1)


def transfer(judges: Mapping[str, tuple[nn.Module, Sequence[float], Sequence[float]]], pixels: torch.Tensor,
             classes: Sequence[int]) -> pd.DataFrame:
    """The transfer matrix of class images: for every judge (name -> ``(model, mean, std)``) and image ``i``
    made for class ``classes[i]``, the probability the judge gives that class, its predicted class and
    whether it recognises the image (predicts the class). One row per (judge, image)."""
    rows = []
    for name, (model, mean, std) in judges.items():
        prob = predict(model, pixels, mean, std)
        for i, k in enumerate(classes):
            rows.append({"judge": name, "image": i, "class": int(k), "probability": float(prob[i, k]),
                         "predicted": int(prob[i].argmax()), "recognised": bool(int(prob[i].argmax()) == int(k))})
    return pd.DataFrame(rows, columns=["judge", "image", "class", "probability", "predicted", "recognised"])
