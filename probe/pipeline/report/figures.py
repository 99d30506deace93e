"""Figures and images as data URIs: matplotlib (Agg) figures, and numpy image grids via PIL.

PNG bytes carry no timestamp, so the same inputs give the same page.
"""

from __future__ import annotations

import base64
import io
import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from PIL import Image  # noqa: E402

from probe.pipeline.report.legible import problems  # noqa: E402

log = logging.getLogger(__name__)

sns.set_theme(style="whitegrid", context="notebook")


def palette(labels: list[str]) -> dict[str, tuple]:
    """One colour per run, the same in every figure of the page."""
    colours = sns.color_palette("tab10", n_colors=max(len(labels), 1))
    return {label: colours[i % len(colours)] for i, label in enumerate(labels)}


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_uri(fig) -> str:
    """Save a matplotlib figure as a PNG data URI and close it; log a warning for each way it is not readable
    (:func:`probe.pipeline.report.legible.problems`: overlapping texts, undefined or out-of-range values)."""
    for problem in problems(fig):
        log.warning("figure '%s': %s", _title(fig), problem)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return png_uri(buf.getvalue())


def _title(fig) -> str:
    if fig._suptitle is not None and fig._suptitle.get_text():
        return fig._suptitle.get_text()
    return next((ax.get_title() for ax in fig.axes if ax.get_title()), "untitled")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def grid_uri(images: np.ndarray, cols: int, scale: int = 2, pad: int = 1, signed: bool = False) -> str:
    """Images ``(N, C, H, W)`` (C = 1 or 3; values in [0, 1], or any sign with ``signed``) as one PNG.

    ``signed`` maps each image symmetrically around zero to a blue-white-red scale.
    """
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    rows = -(-n // cols)
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i, img in enumerate(images):
        if signed:
            m = float(np.abs(img).max()) or 1.0
            v = img.mean(0) / m  # in [-1, 1]
            rgb = np.stack([1 - np.clip(-v, 0, 1), 1 - np.abs(v), 1 - np.clip(v, 0, 1)], -1)
        else:
            rgb = np.repeat(img.transpose(1, 2, 0), 3 // c, axis=2) if c in (1, 3) else img.mean(0)[..., None].repeat(3, 2)
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = rgb
    im = Image.fromarray(_to_uint8(canvas))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return png_uri(buf.getvalue())


def image_uri(img: np.ndarray, signed: bool = False) -> str:
    """One image ``(C, H, W)`` as a PNG at its own size (the page enlarges it, pixelated)."""
    return grid_uri(img[None], cols=1, scale=1, pad=0, signed=signed)


def minmax(x: np.ndarray, axes=(-2, -1)) -> np.ndarray:
    """Scale each map to [0, 1] over ``axes`` (constant maps become 0)."""
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    return (x - lo) / np.where(hi - lo > 0, hi - lo, 1)


def heat_overlay(images: np.ndarray, maps: np.ndarray, peak: float | None = None) -> np.ndarray:
    """Grey images ``(N, C, H, W)`` in [0, 1] under a red heat map of ``maps`` ``(N, H, W)`` -> ``(N, 3, H, W)``:
    each map scaled to [0, 1] on its own, or (``peak``) ``|map| / peak`` for all alike (a weak map stays faint)."""
    grey = images.mean(1)
    heat = minmax(np.abs(maps)) if peak is None else np.clip(np.abs(maps) / (peak or 1.0), 0, 1)
    r = np.clip(0.6 * grey + heat, 0, 1)
    g = 0.6 * grey * (1 - heat) + 0.3 * heat
    b = 0.6 * grey * (1 - heat)
    return np.stack([r, g, b], 1)
