"""Figures of the geometry stage (matplotlib, Agg backend; every figure closed after saving)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def erf_heatmaps(maps: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One row per input kind (probe, noise), one column per layer: ERF maps, each scaled to its maximum."""
    kinds = list(maps)
    layers = list(maps[kinds[0]])
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(1.6 * len(layers) + 0.6, 1.7 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        for c, name in enumerate(layers):
            ax = axes[r][c]
            m = maps[kind][name]
            ax.imshow(m / m.max() if m.max() > 0 else m, cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(kind, fontsize=8)
    _save(fig, path)


def erf_vs_depth(erf: pd.DataFrame, path: Path) -> None:
    """ERF side (per input kind) and theoretical RF against layer depth."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * erf["layer"].nunique() + 2), 3.2))
    first = erf[erf["input"] == erf["input"].iloc[0]].sort_values("depth")
    x = np.arange(len(first))
    ax.plot(x, first["trf"], "k--", marker="s", label="theoretical RF")
    for kind, g in erf.groupby("input", sort=False):
        ax.plot(x, g.sort_values("depth")["erf_side"], marker="o", label=f"ERF ({kind}, {first['mass'].iloc[0]:.0%} mass)")
    ax.axhline(first["image_size"].iloc[0], color="grey", lw=0.8, label="image size")
    ax.set_xticks(x, first["layer"], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("side (input pixels)")
    ax.legend(fontsize=7)
    _save(fig, path)


def equivariance_by_depth(eq: pd.DataFrame, path: Path) -> None:
    """Normalised equivariance error per layer, one line per shift, one panel per border mode."""
    modes = list(eq["mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.2), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        g = eq[eq["mode"] == mode].groupby(["depth", "layer", "shift"], as_index=False)["error"].mean()
        names = g.drop_duplicates("depth").sort_values("depth")["layer"].tolist()
        for n, s in g.groupby("shift"):
            ax.plot(np.arange(len(s)), s.sort_values("depth")["error"], marker="o", label=f"shift {n}")
        ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{mode} shifts", fontsize=9)
        ax.set_ylabel("||f(Tx) - T'f(x)|| / ||f(x)||")
        ax.legend(fontsize=7)
    _save(fig, path)


def shift_survival(inv: pd.DataFrame, path: Path) -> None:
    """Share of probe images whose predicted class survives a shift, against the shift."""
    out = inv[(inv["layer"] == "output") & (inv["transform"] == "shift")]
    g = out.groupby(["mode", "amount"], as_index=False)[["survival", "accuracy"]].mean()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for mode, s in g.groupby("mode"):
        ax.plot(s["amount"], s["survival"], marker="o", label=f"prediction kept ({mode})")
        ax.plot(s["amount"], s["accuracy"], marker="x", ls=":", label=f"accuracy ({mode})")
    ax.set_xlabel("shift (input pixels)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    _save(fig, path)


def dynamics(df: pd.DataFrame, filters: dict[str, np.ndarray], path_curves: Path, path_filters: Path) -> None:
    """Sparsity and dead fraction per layer against epoch; first-layer filters, one row per snapshot."""
    if not df.empty:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.0))
        for (depth, layer), g in df.groupby(["depth", "layer"]):
            for ax, col in zip(axes, ("sparsity", "dead_fraction")):
                ax.plot(g["epoch"], g[col], marker="o", label=layer)
        for ax, col in zip(axes, ("sparsity", "dead_fraction")):
            ax.set_xlabel("epoch"), ax.set_title(col, fontsize=9), ax.set_ylim(-0.02, 1.02)
        axes[1].legend(fontsize=6)
        _save(fig, path_curves)
    if filters:
        epochs = list(filters)
        n = min(16, filters[epochs[0]].shape[0])
        fig, axes = plt.subplots(len(epochs), n, figsize=(0.7 * n + 0.8, 0.75 * len(epochs)), squeeze=False)
        for r, e in enumerate(epochs):
            w = filters[e]
            for c in range(n):
                f = w[c]
                img = f.transpose(1, 2, 0) if f.shape[0] == 3 else f.mean(0)
                lo, hi = img.min(), img.max()
                axes[r][c].imshow((img - lo) / (hi - lo) if hi > lo else img * 0, cmap=None if img.ndim == 3 else "gray")
                axes[r][c].set_xticks([]), axes[r][c].set_yticks([])
            axes[r][0].set_ylabel(e.replace("epoch_", "ep "), fontsize=7)
        _save(fig, path_filters)
