"""Writing the synthesis folder's PNG grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from probe.files import write_bytes
from probe.images import rows_of, tile_grid


def grid_png(path: Path, images: np.ndarray, cols: int | None = None, min_tile: int = 64, gap: int = 2) -> None:
    """Tile ``images`` ``(N, C, H, W)`` in [0, 1] (C = 1 or 3) into one PNG, upscaled (nearest) so each
    tile is at least ``min_tile`` pixels wide, on a white background."""
    n, c, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    k = max(1, int(np.ceil(min_tile / w)))
    tiles = [np.asarray(im, dtype=np.float32).transpose(1, 2, 0).repeat(k, 0).repeat(k, 1) for im in images]
    canvas = tile_grid(rows_of(tiles, cols), gap, 1.0)
    arr = (np.clip(np.nan_to_num(canvas, nan=0.0), 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[:, :, 0], "L") if c == 1 else Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes(Path(path), buf.getvalue())
