"""Invariance: how much predictions and globally pooled features change under shifts, rotations
and scalings of the input."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import pandas as pd
import torch

from probe.geometry.equivariance import normalised_error
from probe.geometry.transforms import AXIS_DIM, affine, shift
from probe.uncertainty import proportion_interval


@dataclass(frozen=True)
class Transform:
    kind: str  # shift | rotate | scale
    amount: float  # pixels | degrees | zoom factor
    axis: str  # x | y for shifts, "xy" otherwise
    mode: str  # circular | zero (what comes in at the border)
    apply: Callable[[torch.Tensor], torch.Tensor]


def transforms(shifts: list[int], axes: list[str], modes: list[str], rotations: list[float], scales: list[float],
               fill: torch.Tensor | float = 0.0) -> list[Transform]:
    """Every shift (per axis and mode), then every rotation and scaling (black comes in)."""
    out = [Transform("shift", float(n), a, m, partial(shift, n=n, dim=AXIS_DIM[a], mode=m, fill=fill))
           for m in modes for a in axes for n in shifts]
    out += [Transform("rotate", float(r), "xy", "zero", partial(affine, degrees=r, fill=fill)) for r in rotations]
    out += [Transform("scale", float(s), "xy", "zero", partial(affine, scale=s, fill=fill)) for s in scales]
    return out


def pooled(y: torch.Tensor) -> torch.Tensor:
    """Global average over the spatial axes of a map ``(N, C, H, W)`` -> ``(N, C)``; other outputs flattened."""
    return y.mean(dim=(-2, -1)) if y.dim() == 4 else y.flatten(1)


def invariance_rows(t: Transform, out0: torch.Tensor, base: dict[str, torch.Tensor], out: torch.Tensor,
                    acts: dict[str, torch.Tensor], y: torch.Tensor, layers: list[str], types: dict[str, str]) -> list[dict]:
    """Rows for one transform ``t``: ``out0``/``base`` are the output and layer outputs for the images,
    ``out``/``acts`` those for the transformed images, ``y`` the labels."""
    key = {"transform": t.kind, "amount": t.amount, "axis": t.axis, "mode": t.mode}
    pred0, pred = out0.argmax(1), out.argmax(1)
    k, n = int((pred == pred0).sum()), len(pred)
    survival = proportion_interval(k, n)
    rows = [{**key, "layer": "output", "type": "output", "depth": len(layers), "change": normalised_error(out, out0),
             "prob_change": float(0.5 * (out.softmax(1) - out0.softmax(1)).abs().sum(1).mean()),
             "survival": survival.value, "k": k, "n": n, "survival_low": survival.low, "survival_high": survival.high,
             "accuracy": float((pred == y).float().mean()), "accuracy_clean": float((pred0 == y).float().mean())}]
    nan = float("nan")
    for i, name in enumerate(layers):
        if name in base and name in acts:
            rows.append({**key, "layer": name, "type": types[name], "depth": i,
                         "change": normalised_error(pooled(acts[name]), pooled(base[name])),
                         "prob_change": nan, "survival": nan, "k": None, "n": None, "survival_low": nan, "survival_high": nan,
                         "accuracy": nan, "accuracy_clean": nan})
    return rows


def invariance_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table with :data:`COLUMNS`; ``k`` and ``n`` as nullable integers (null on layer rows)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    df[["k", "n"]] = df[["k", "n"]].astype("Int64")
    return df


COLUMNS = ["transform", "amount", "axis", "mode", "layer", "type", "depth", "change", "prob_change", "survival",
           "k", "n", "survival_low", "survival_high", "accuracy", "accuracy_clean"]
