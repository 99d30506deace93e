"""Writing the synthesis folder's PNG grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from probe.files import write_bytes


def grid_png(path: Path, images: np.ndarray, cols: int | None = None, min_tile: int = 64, gap: int = 2) -> None:
    """Tile ``images`` ``(N, C, H, W)`` in [0, 1] (C = 1 or 3) into one PNG, upscaled (nearest) so each
    tile is at least ``min_tile`` pixels wide, on a white background."""
    n, c, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    k = max(1, int(np.ceil(min_tile / w)))
    th, tw = h * k, w * k
    canvas = np.ones((rows * (th + gap) + gap, cols * (tw + gap) + gap, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        tile = np.asarray(images[i], dtype=np.float32).transpose(1, 2, 0).repeat(k, 0).repeat(k, 1)
        y, x = gap + r * (th + gap), gap + q * (tw + gap)
        canvas[y:y + th, x:x + tw] = tile
    arr = (np.clip(np.nan_to_num(canvas, nan=0.0), 0, 1) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[:, :, 0], "L") if c == 1 else Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes(Path(path), buf.getvalue())
