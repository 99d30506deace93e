"""Streaming top-k dataset exemplars per channel, and crops of the input around each one.

Ranking key: a channel's spatial mean activation on an image (what feature visualisation
optimises). Ties are broken by the lower image index, so the result does not depend on how the
images were batched or sharded. The running top-k stays on the device: each batch is merged by
sorting the concatenation of the kept and the new candidates (two stable sorts: index, then value).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from probe.activations.stats import BatchSummary

COLUMNS = ("value", "max_value", "argmax", "index")


class TopK:
    """The ``k`` images with the highest spatial mean activation, per channel (kept as ``(C, k)``)."""

    def __init__(self, name: str, k: int):
        self.name, self.k = name, k
        self.kept: dict[str, torch.Tensor] | None = None  # each (C, <=k); index int64

    def update(self, summary: BatchSummary, start: int) -> None:
        """Add a batch whose first image has index ``start`` in the analysed split (after every kept one)."""
        N, C = summary.mean.shape
        index = torch.arange(start, start + N, device=summary.mean.device).expand(C, N)
        new = {"value": summary.mean.T, "max_value": summary.max.T, "argmax": summary.argmax.T, "index": index}
        # new indices all follow the kept ones, so one stable sort keeps ties in index order
        self._merge(new, by_index=False)

    def merge(self, other: "TopK") -> "TopK":
        """Merge the exemplars of other images (any indices)."""
        if other.kept is not None:
            device = self.kept["value"].device if self.kept else other.kept["value"].device
            self._merge({c: v.to(device) for c, v in other.kept.items()}, by_index=True)
        return self

    def _merge(self, new: dict[str, torch.Tensor], by_index: bool) -> None:
        both = new if self.kept is None else {c: torch.cat([self.kept[c], new[c]], dim=1) for c in COLUMNS}
        value = both["value"].contiguous()
        if by_index:
            first = torch.sort(both["index"], dim=1, stable=True).indices
            value = value.gather(1, first)
            order = first.gather(1, torch.sort(value, dim=1, descending=True, stable=True).indices[:, : self.k])
        else:
            order = torch.sort(value, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.kept = {c: both[c].gather(1, order) for c in COLUMNS}

    def state(self) -> dict[str, np.ndarray]:
        return {c: v.cpu().numpy() for c, v in (self.kept or {}).items()}

    @classmethod
    def from_state(cls, name: str, k: int, state: dict[str, np.ndarray], device="cpu") -> "TopK":
        self = cls(name, k)
        if state:
            self.kept = {c: torch.as_tensor(state[c], device=device) for c in COLUMNS}
        return self

    def to_frame(self, width: int, labels: np.ndarray) -> pd.DataFrame:
        """Rows (layer, channel, rank, index, value, max_value, y, x, label); ``width`` of the layer's map."""
        kept = self.state()
        C, k = kept["value"].shape
        argmax = kept["argmax"].astype(np.int64).reshape(-1)
        index = kept["index"].astype(np.int64).reshape(-1)
        return pd.DataFrame({
            "layer": self.name,
            "channel": np.repeat(np.arange(C), k),
            "rank": np.tile(np.arange(k), C),
            "index": index,
            "value": kept["value"].astype(np.float64).reshape(-1),
            "max_value": kept["max_value"].astype(np.float64).reshape(-1),
            "y": argmax // width,
            "x": argmax % width,
            "label": np.asarray(labels)[index].astype(np.int64),
        })


def crop_boxes(y: np.ndarray, x: np.ndarray, rf: tuple[int, int], stride: tuple[int, int],
               centre0: tuple[float, float], image: tuple[int, int]) -> np.ndarray:
    """``(n, 4)`` boxes (top, left, height, width) in input pixels around units at map position (y, x).

    A unit's centre is ``centre0 + position * stride`` (per axis); the box has the receptive
    field's size, capped at the image, and is shifted to lie inside the image.
    """
    out = []
    for pos, r, j, c0, size in zip((y, x), rf, stride, centre0, image):
        r = min(int(r), size)
        start = np.rint(c0 + np.asarray(pos) * j - (r - 1) / 2).astype(np.int64)
        out.append((np.clip(start, 0, size - r), np.full(len(start), r)))
    (top, h), (left, w) = out
    return np.stack([top, left, h, w], axis=1)


def crop_images(images: torch.Tensor, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops of ``images`` ``(n, C, H, W)`` in [0, 1] at ``boxes``, resized to at most ``size``: uint8 ``(n, C, s, s)``."""
    h, w = int(boxes[0, 2]), int(boxes[0, 3])
    s = (min(h, size), min(w, size))
    crops = torch.stack([im[:, t : t + h, l : l + w] for im, (t, l, _, _) in zip(images, boxes)])
    if (h, w) != s:
        crops = F.interpolate(crops, size=s, mode="bilinear", antialias=True, align_corners=False)
    return (crops.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
