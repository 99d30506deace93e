"""``probe concepts``: the stage's configuration (keys under ``concepts.``), checked in ``__post_init__``.

What needs the model (the layer exists, ``k`` fits its channels) is checked when the stage opens the run:
the layer by the CLI before anything is written (the record's ``layer_keys``), ``k`` by the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from probe.errors import ConfigError
from probe.pipeline.config import AnalysisStage, check_range


@dataclass
class ConceptsConfig:
    layer: Optional[str] = None  # None: the model's last nn.Conv2d (probe.hooks.conv_layers(model)[-1])
    k: int = 10  # concepts (rows of W); at most the layer's channels
    max_samples: int = 20000  # activation rows (one per spatial position) kept for the fit: the memory bound
    ks: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10, 12, 16])  # the k-curve, clipped to the channels
    n_designs: int = 32  # Sobol designs per image (a power of two >= 2): n_designs * (k + 1) head passes per image
    importance_per_class: int = 4  # besides the probe images, the first this many images of each class get Sobol indices
    top: int = 8  # top images (crops) per concept, by the concept's maximum coefficient
    crop_size: int = 32  # crops larger than this (the receptive field in pixels) are resized down to it
    stability: bool = True  # split-half stability of the concepts (two more fits)
    stability_threshold: float = 0.8  # a concept is stable when its match in the other half has cosine above this

    def __post_init__(self) -> None:
        check_range("concepts.k", self.k, 1)
        check_range("concepts.max_samples", self.max_samples, 1)
        if not self.ks:
            raise ConfigError("concepts.ks: [] is not allowed; give at least one k, e.g. [2, 4, 8]")
        for k in self.ks:
            check_range("concepts.ks", k, 1)
        n = self.n_designs
        if n < 2 or n & (n - 1):
            raise ConfigError(f"concepts.n_designs: {n} is not allowed; must be a power of two >= 2 (e.g. 32)")
        check_range("concepts.importance_per_class", self.importance_per_class, 0)
        check_range("concepts.top", self.top, 1)
        check_range("concepts.crop_size", self.crop_size, 4)
        check_range("concepts.stability_threshold", self.stability_threshold, -1.0, 1.0)
        if self.stability and self.max_samples < 2 * self.k:
            raise ConfigError(f"concepts.max_samples: {self.max_samples} is out of range; split-half stability "
                              f"needs two halves of at least concepts.k = {self.k} rows: >= {2 * self.k} "
                              f"(or concepts.stability=false)")


@dataclass
class ConceptsStage(AnalysisStage):
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
