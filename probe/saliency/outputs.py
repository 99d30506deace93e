"""Writing the stage's heat-map overlays (arrays go through :func:`probe.files.write_npz`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def overlay_grid(path: Path, images: np.ndarray, maps: np.ndarray, titles: list[str], signed: bool,
                 method: str, ncols: int = 10) -> None:
    """One PNG: each image (N, C, H, W) in [0, 1] under its map (N, H, W) as a translucent heat map.

    Signed maps use a diverging colour map centred on 0; magnitudes a sequential one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.5 * ncols, 1.7 * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img = images[i].transpose(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        m = maps[i]
        if signed:
            lim = float(np.abs(m).max()) or 1.0
            ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.6)
        else:
            ax.imshow(m, cmap="inferno", vmin=float(m.min()), vmax=float(m.max()) or 1.0, alpha=0.6)
        ax.set_title(titles[i], fontsize=7)
    fig.suptitle(method, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
