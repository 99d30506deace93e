"""``probe activations`` configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from probe.config import AnalysisStage, check_range


@dataclass
class ActivationsStage(AnalysisStage):
    layers: list[str] = field(default_factory=list)  # empty: every conv, linear and pooling layer
    top_k: int = 8  # exemplars per channel
    hist_bits: int = 4  # histogram grid: 2^bits bins per octave (quantiles within 2^-bits relative)
    hist_octaves: int = 20  # grid covers |x| in [2^-octaves, 2^octaves), plus tiny/zero/overflow bins
    hist_stride: int = 1  # histogram every n-th position of each map only (1: all; >1 faster, quantiles subsampled)
    per_channel_hist: bool = False  # hist.parquet also per channel (not only per layer)
    feature_map_layers: Optional[list[str]] = None  # null: the requested layers with spatial maps
    crop_channels: Optional[int] = 64  # exemplar crops for the first n channels of each layer (null: all)
    crop_size: int = 32  # crops larger than this (receptive field in pixels) are resized down to it
    images: bool = True  # PNG grids beside the arrays
    save_state: bool = False  # also write state.npz (the mergeable accumulators, for sharded runs)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("top_k", self.top_k, 1)
        check_range("hist_bits", self.hist_bits, 1, 8)
        check_range("hist_octaves", self.hist_octaves, 1, 126)
        check_range("hist_stride", self.hist_stride, 1)
        check_range("crop_channels", self.crop_channels, 1)
        check_range("crop_size", self.crop_size, 4)
