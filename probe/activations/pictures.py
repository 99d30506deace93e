"""Kernels, feature maps and exemplar crops as arrays and PNG grids (PIL, deterministic bytes).

Kernels of the first conv layer are the only ones that live in input space: they are drawn as
images (RGB: each kernel min-max scaled to [0, 1]; greyscale: a diverging map, red > 0, blue < 0,
each kernel scaled by its max |w| so that 0 is white and the sign stays visible). Deeper conv
layers get a per-output-channel view, the mean over input channels, labelled as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn as nn
from PIL import Image, ImageDraw

from probe.hooks import first_conv
from probe.images import minmax, rows_of, tile_grid

MAX_TILES = 64  # channels drawn per grid


def kernel_arrays(model: nn.Module, layers: list[str]) -> dict[str, np.ndarray]:
    """``filters.npz`` content: the first conv's weights and images, deeper convs' input-channel means."""
    modules = dict(model.named_modules())
    first = first_conv(model)
    out: dict[str, np.ndarray] = {}
    if first is not None:
        w = modules[first].weight.detach().float().cpu().numpy()  # (O, I, kh, kw)
        out[f"{first}/weight"] = w
        if w.shape[1] == 3:
            out[f"{first}/rgb_minmax"] = minmax(w.transpose(0, 2, 3, 1), (1, 2, 3))  # (O, kh, kw, 3)
        else:
            g = w.mean(1)
            out[f"{first}/signed_scaled"] = g / np.maximum(np.abs(g).max((1, 2), keepdims=True), 1e-12)  # [-1, 1]
    for name in layers:
        m = modules[name]
        if isinstance(m, nn.Conv2d) and name != first:
            out[f"{name}/mean_over_input_channels"] = m.weight.detach().float().mean(1).cpu().numpy()  # (O, kh, kw)
    return out


def diverging(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB uint8: blue (-1), white (0), red (+1)."""
    v = np.clip(v, -1, 1)[..., None]
    white = np.ones(3)
    rgb = np.where(v >= 0, white + v * (np.array([0.8, 0.1, 0.1]) - white), white - v * (np.array([0.1, 0.2, 0.8]) - white))
    return (rgb * 255).round().astype(np.uint8)


def viridis(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 with matplotlib's viridis."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.clip(v, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def tile(rows: list[list[np.ndarray]], title: str, scale: int = 1) -> Image.Image:
    """A grid of equal-size RGB uint8 tiles ``(h, w, 3)`` with a one-line title above it."""
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    gap, head = 2, 14
    grid = tile_grid([[np.asarray(Image.fromarray(t).resize((w, h), Image.NEAREST)) for t in row] for row in rows], gap, 255)
    canvas = Image.new("RGB", (max(grid.shape[1], 6 * len(title) + 4), head + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (0, head))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
    return canvas


def upscale(size: int) -> int:
    return max(1, 32 // max(size, 1))


def save_kernel_grids(arrays: dict[str, np.ndarray], folder: Path) -> list[str]:
    written = []
    for key, a in arrays.items():
        layer, kind = key.rsplit("/", 1)
        if kind == "weight" or a.shape[1] * a.shape[2] <= 1:
            continue
        a = a[:MAX_TILES]
        if kind == "rgb_minmax":
            tiles, title = [(t * 255).round().astype(np.uint8) for t in a], f"{layer}: kernels (RGB, each min-max scaled)"
        elif kind == "signed_scaled":
            tiles, title = [diverging(t) for t in a], f"{layer}: kernels (red > 0, blue < 0, each scaled by max |w|)"
        else:
            s = a / np.maximum(np.abs(a).max((1, 2), keepdims=True), 1e-12)
            tiles, title = [diverging(t) for t in s], f"{layer}: MEAN OVER INPUT CHANNELS per output channel (not a kernel image)"
        rows = rows_of(tiles, 16)
        name = f"filters_{layer}_{kind}.png"
        tile(rows, title, upscale(a.shape[1])).save(folder / name)
        written.append(name)
    return written


def save_feature_map_grid(layer: str, maps: np.ndarray, labels: np.ndarray, folder: Path) -> str:
    """``maps`` ``(P, C, H, W)``: one row per probe image, first 16 channels, each map min-max scaled."""
    a = minmax(maps[:, :16].astype(np.float32), (2, 3))
    rows = [[viridis(m) for m in img] for img in a]
    name = f"feature_maps_{layer}.png"
    title = f"{layer}: rows = probe images (labels {','.join(map(str, labels))}), cols = channels 0-{a.shape[1] - 1}, each map min-max scaled"
    tile(rows, title, upscale(a.shape[2])).save(folder / name)
    return name


def save_crop_grid(layer: str, crops: np.ndarray, folder: Path) -> str:
    """``crops`` uint8 ``(C, k, ch, h, w)``: one row per channel (first 64), top-k left to right."""
    c = crops[:MAX_TILES]
    rgb = np.repeat(c, 3, axis=2) if c.shape[2] == 1 else c
    rows = [[t.transpose(1, 2, 0) for t in ch] for ch in rgb]
    name = f"exemplars_{layer}.png"
    tile(rows, f"{layer}: rows = channels, cols = top-{c.shape[1]} images (crop = receptive field)", upscale(c.shape[3])).save(folder / name)
    return name
