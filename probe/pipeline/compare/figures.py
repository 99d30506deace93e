"""The CKA heatmap of a comparison: every layer of every run against every other, runs in blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def cka_matrix(cka: pd.DataFrame, labels: list[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The symmetric ``(m, m)`` CKA matrix over every ``(run, layer)`` in run order, then layer order."""
    keys = list(dict.fromkeys([*zip(cka.run_a, cka.layer_a), *zip(cka.run_b, cka.layer_b)]))
    keys.sort(key=lambda k: labels.index(k[0]))  # stable: layers stay in model order
    index = {k: i for i, k in enumerate(keys)}
    m = np.full((len(keys), len(keys)), np.nan)
    for ra, la, rb, lb, c in zip(cka.run_a, cka.layer_a, cka.run_b, cka.layer_b, cka.cka):
        m[index[ra, la], index[rb, lb]] = m[index[rb, lb], index[ra, la]] = c
    return m, keys


def save_heatmaps(cka: pd.DataFrame, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, keys = cka_matrix(cka, labels)
    size = min(16.0, 3.0 + 0.16 * len(keys))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(keys)), [k[1] for k in keys], rotation=90, fontsize=6)
    ax.set_yticks(range(len(keys)), [k[1] for k in keys], fontsize=6)
    bounds = [i for i in range(1, len(keys)) if keys[i][0] != keys[i - 1][0]]
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=1.2)
        ax.axvline(b - 0.5, color="white", lw=1.2)
    starts = [0, *bounds]
    ends = [*bounds, len(keys)]
    for s, e in zip(starts, ends):
        ax.text((s + e - 1) / 2, -1.0, keys[s][0], ha="center", va="bottom", fontsize=8)
    ax.set_title("linear CKA (minibatch, unbiased HSIC) between every layer of every run", fontsize=9, pad=22)
    fig.colorbar(im, ax=ax, fraction=0.04, label="CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
