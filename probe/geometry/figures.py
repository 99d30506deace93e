"""Figures of the geometry stage (matplotlib, Agg backend; every figure closed after saving)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from probe.images import minmax, tile_grid  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _mosaic(ax, tiles: list[list[np.ndarray]], rows: list[str], cols: list[str], cmap: str | None) -> None:
    """Tiles of equal size ``(h, w)`` or ``(h, w, 3)``, each scaled to [0, 1], drawn as one image on one
    axes (one axes per tile costs seconds in matplotlib)."""
    h, w = tiles[0][0].shape[:2]
    grid = tile_grid([[minmax(t) for t in row] for row in tiles], 1, 1.0, np.float64)
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([1 + c * (w + 1) + w / 2 - 0.5 for c in range(len(cols))], cols, rotation=45, ha="left", fontsize=7)
    ax.set_yticks([1 + r * (h + 1) + h / 2 - 0.5 for r in range(len(rows))], rows, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)


def erf_heatmaps(maps: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """One row per input kind (probe, noise), one column per layer: ERF maps, each scaled to its maximum."""
    kinds = list(maps)
    layers = list(maps[kinds[0]])
    fig, ax = plt.subplots(figsize=(1.1 * len(layers) + 1.2, 1.2 * len(kinds) + 1.0))
    _mosaic(ax, [[maps[k][n] for n in layers] for k in kinds], kinds, layers, "magma")
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
    """Normalised equivariance error on the interior units (receptive fields clear of padding and of what came
    in or wrapped round at the border) per layer, named with its map size, one line per shift, one panel per
    border mode; layers whose map is too small for a shift (``measurable`` False) are left out of that shift."""
    eq = eq[eq["measurable"]]
    modes = list(eq["mode"].unique())
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(4.2 * max(len(modes), 1), 3.2), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        g = eq[eq["mode"] == mode].groupby(["depth", "layer", "map_h", "map_w", "shift"], as_index=False)["error_interior"].mean()
        names = g.drop_duplicates("depth").sort_values("depth")
        pos = {d: i for i, d in enumerate(names["depth"])}
        for n, s in g.groupby("shift"):
            s = s.sort_values("depth")
            ax.plot([pos[d] for d in s["depth"]], s["error_interior"], marker="o", label=f"shift {n}")
        ax.set_xticks(np.arange(len(names)), [f"{r.layer} ({r.map_h}x{r.map_w})" for r in names.itertuples()],
                      rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{mode} shifts, interior units", fontsize=9)
        ax.set_ylabel("||f(Tx) - T'f(x)|| / ||f(x)||")
        ax.legend(fontsize=7)
    _save(fig, path)


def shift_survival(inv: pd.DataFrame, path: Path) -> None:
    """Share of probe images whose predicted class survives a shift, against the shift, per border mode and
    axis, with Wilson's 95% interval as error bars."""
    out = inv[(inv["layer"] == "output") & (inv["transform"] == "shift")].sort_values("amount")
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for (mode, axis), s in out.groupby(["mode", "axis"]):
        err = np.stack([s["survival"] - s["survival_low"], s["survival_high"] - s["survival"]]).astype(float)
        ax.errorbar(s["amount"], s["survival"], yerr=err, marker="o", capsize=2, label=f"prediction kept ({mode}, {axis})")
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

        def tile(f):  # (in, k, k): RGB when there are 3 input channels, else their mean
            return f.transpose(1, 2, 0) if f.shape[0] == 3 else f.mean(0)

        fig, ax = plt.subplots(figsize=(0.45 * n + 1.0, 0.5 * len(epochs) + 0.8))
        _mosaic(ax, [[tile(filters[e][c]) for c in range(n)] for e in epochs],
                [e.replace("epoch_", "epoch ") for e in epochs], [str(c) for c in range(n)], "gray")
        ax.set_title("first-layer filters", fontsize=8)
        _save(fig, path_filters)
