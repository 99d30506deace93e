"""``probe activations`` and ``probe activations_merge``: their configuration, keys under ``activations.``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from probe.pipeline.config import AnalysisStage, check_range
from probe.errors import ConfigError

SHARD_FORM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` stays ``None``."""
    if value is None:
        return None
    m = SHARD_FORM.match(str(value))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"activations.shard: '{value}' is not allowed; expected the form i/n with 0 <= i < n "
                          "(e.g. activations.shard=0/4)")
    return int(m.group(1)), int(m.group(2))


@dataclass
class ActivationsConfig:
    layers: list[str] = field(default_factory=list)  # empty: every conv, linear and pooling layer
    top_k: int = 8  # exemplars per channel
    hist_bits: int = 4  # histogram grid: 2^bits bins per octave (quantiles within 2^-bits relative)
    hist_octaves: int = 20  # grid covers |x| in [2^-octaves, 2^octaves), plus tiny/zero/overflow bins
    hist_stride: int = 1  # histogram every n-th position of each map only (1: all; >1 faster, quantiles subsampled)
    per_channel_hist: bool = True  # hist.parquet also per channel (the report's unit atlas draws them), not only per layer
    feature_map_layers: Optional[list[str]] = None  # null: the requested layers with spatial maps
    crop_channels: Optional[int] = None  # exemplar crops for the first n channels of each layer (null: all, as the report's atlas shows every unit)
    crop_size: int = 32  # crops larger than this (receptive field in pixels) are resized down to it
    images: bool = True  # PNG grids beside the arrays
    save_state: bool = False  # also write state.npz (the mergeable accumulators, for sharded runs)
    # "i/n": statistics of shard i of n only (contiguous index ranges), written as mergeable state to
    # <run>/activations_shards/<i>-of-<n>/; `probe activations_merge run=<run> activations.shards=<n>` writes
    # activations/
    shard: Optional[str] = None
    amp: bool = True  # CUDA only: forward pass in bf16 autocast (statistics still accumulate in float32/float64)

    def __post_init__(self) -> None:
        check_range("activations.top_k", self.top_k, 1)
        check_range("activations.hist_bits", self.hist_bits, 1, 8)
        check_range("activations.hist_octaves", self.hist_octaves, 1, 126)
        check_range("activations.hist_stride", self.hist_stride, 1)
        check_range("activations.crop_channels", self.crop_channels, 1)
        check_range("activations.crop_size", self.crop_size, 4)
        parse_shard(self.shard)


@dataclass
class ActivationsMergeConfig(ActivationsConfig):
    shards: int = 0  # how many shards `probe activations activations.shard=i/<shards>` wrote (0: not given)


@dataclass
class ActivationsStage(AnalysisStage):
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)


@dataclass
class ActivationsMergeStage(ActivationsStage):
    """``probe activations_merge run=<run> activations.shards=<n>``: the shards' states -> the single-pass
    ``activations/``."""

    activations: ActivationsMergeConfig = field(default_factory=ActivationsMergeConfig)

    def __post_init__(self) -> None:  # here, not in the nested config: its default (0 shards) is built by the schema
        super().__post_init__()
        if self.activations.shard is not None:
            raise ConfigError("activations.shard: not used by activations_merge; give activations.shards=<n> "
                              "(the n of the activations.shard=i/n runs)")
        check_range("activations.shards", self.activations.shards, 1)
