"""``probe compare``: representational similarity of runs on the same images."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from probe.errors import ConfigError
from probe.pipeline.config import DEVICES, SPLITS, check_choice, check_range


@dataclass
class CompareData:
    """The images every run sees (each prepared as its own model takes them)."""

    split: str = "test"  # train | val | test | all, of the dataset the runs were trained on
    # the CKA minibatch (Nguyen et al. 2021 use one fixed size; half the images where that is smaller): the
    # images left over after the last full minibatch are not used (counted in metrics.json)
    batch_size: int = 64
    limit: Optional[int] = None  # only the first `limit` images of the split

    def __post_init__(self) -> None:
        check_choice("data.split", self.split, SPLITS)
        check_range("data.batch_size", self.batch_size, 4)
        check_range("data.limit", self.limit, 1)


@dataclass
class CompareConfig:
    match: bool = True  # units matched across runs of one architecture (every conv and linear layer)
    snapshots: bool = True  # each layer at each snapshot (train.snapshot_epochs) against its final weights
    concept_threshold: float = 0.8  # two runs' matched concepts are the same when their coefficients correlate above this

    def __post_init__(self) -> None:
        check_range("compare.concept_threshold", self.concept_threshold, -1.0, 1.0)


@dataclass
class CompareStage:
    runs: list[str] = field(default_factory=list)  # run dirs to compare
    sweep: Optional[str] = None  # a Hydra multirun dir (or any folder of run dirs): every run dir below it
    name: str = "default"  # written to <out_dir>/<name>/
    out_dir: str = "comparisons"
    data: CompareData = field(default_factory=CompareData)
    compare: CompareConfig = field(default_factory=CompareConfig)
    trust: list[str] = field(default_factory=list)  # import paths a run's card may name (see AnalysisStage)
    device: str = "auto"
    threads: int = 1  # torch's CPU threads: set, never inherited (probe/pipeline/config.py)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) or self.name in (".", ".."):
            raise ConfigError(f"name: '{self.name}' is not allowed; use letters, digits, '_', '-', '.'")
        if not self.runs and not self.sweep:
            raise ConfigError("runs: no runs to compare; give runs=[<run dir>, ...] or sweep=<folder of run dirs>")
        check_choice("device", self.device, DEVICES)
        check_range("threads", self.threads, 1)
