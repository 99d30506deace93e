"""Streaming top-k dataset exemplars per channel, and crops of the input around each one.

Ranking key: a channel's spatial mean activation on an image (what feature visualisation
optimises). Ties are broken by the lower image index, so the result does not depend on how the
images were batched or sharded. The running top-k stays on the device: each batch is merged by
one ``topk`` over the concatenation of the kept and the new candidates, on keys that encode
both the value and the index (:func:`rank_key`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


COLUMNS = ("value", "max_value", "argmax", "index")


def rank_key(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys that order float32 ``value`` descending, then ``index`` ascending; NaN ranks as +inf.

    The float's bits, with the magnitude bits of negatives flipped, order like the float (-0.0 is
    made +0.0); the low 32 bits hold ``2^32 - 1 - index``. Every key is unique, so ``topk`` on
    them is deterministic and no stable sort is needed.
    """
    inf = float("inf")
    bits = (value.nan_to_num(nan=inf, posinf=inf, neginf=-inf) + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | (0xFFFFFFFF - index)


@dataclass
class BatchSummary:
    """Per image and channel, for the exemplars: spatial mean, spatial max and its flat index, ``(N, C)``."""

    mean: torch.Tensor
    max: torch.Tensor
    argmax: torch.Tensor


EMPTY = torch.iinfo(torch.int64).min  # the key of an empty slot: below every real key


class TopK:
    """The ``k`` images with the highest spatial mean activation, per channel.

    Kept as ``(k, C)`` columns plus their :func:`rank_key`, rank 0 first, slots not yet filled at
    the bottom with key :data:`EMPTY`; a batch's ``(N, C)`` summary joins them without a transpose.
    The columns are allocated once and updated in place, so views of them stay valid.
    :meth:`state` gives the filled ``(C, <=k)`` part.
    """

    def __init__(self, name: str, k: int):
        self.name, self.k = name, k
        self.kept: dict[str, torch.Tensor] | None = None  # "key" and COLUMNS, each (k, C)
        self.ranked = 0  # candidates ranked so far (a merged TopK brings at most k)

    def _init(self, C: int, device) -> None:
        self.kept = {"key": torch.full((self.k, C), EMPTY, device=device),
                     "value": torch.full((self.k, C), float("nan"), device=device),
                     "max_value": torch.full((self.k, C), float("nan"), device=device),
                     "argmax": torch.zeros((self.k, C), dtype=torch.int64, device=device),
                     "index": torch.full((self.k, C), -1, dtype=torch.int64, device=device)}

    def update(self, summary: BatchSummary, start: int) -> None:
        """Add a batch whose first image has index ``start`` in the analysed split."""
        N, C = summary.mean.shape
        index = torch.arange(start, start + N, device=summary.mean.device)[:, None].expand(N, C)
        self._merge({"value": summary.mean, "max_value": summary.max, "argmax": summary.argmax, "index": index})

    def merge(self, other: "TopK") -> "TopK":
        """Merge the exemplars of other images."""
        if other.ranked:
            device = self.kept["key"].device if self.kept else other.kept["key"].device
            self._merge({c: other.kept[c][: other.filled].to(device) for c in COLUMNS})
        return self

    def _merge(self, new: dict[str, torch.Tensor]) -> None:
        if self.kept is None:
            self._init(new["value"].shape[1], new["value"].device)
        new["key"] = rank_key(new["value"], new["index"])
        both = {c: torch.cat([v, new[c]]) for c, v in self.kept.items()}
        order = torch.topk(both["key"], self.k, dim=0).indices
        for c, v in both.items():  # in place: the CPU kernel keeps views of these columns
            torch.gather(v, 0, order, out=self.kept[c])
        self.ranked += len(new["key"])

    @property
    def filled(self) -> int:
        return min(self.k, self.ranked)

    def state(self) -> dict[str, np.ndarray]:
        """``(C, <=k)`` arrays of COLUMNS, rank 0 first."""
        return {c: self.kept[c][: self.filled].T.cpu().numpy() for c in COLUMNS} if self.ranked else {}

    @classmethod
    def from_state(cls, name: str, k: int, state: dict[str, np.ndarray], device="cpu") -> "TopK":
        self = cls(name, k)
        if state:
            self._merge({c: torch.as_tensor(state[c], device=device).T.contiguous() for c in COLUMNS})
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
