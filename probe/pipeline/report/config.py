from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from probe.pipeline.config import check_range
from probe.errors import ConfigError


@dataclass
class ReportStage:
    runs: list[str] = field(default_factory=list)  # run dirs to compare
    sweep: Optional[str] = None  # a Hydra multirun dir: every run dir below it
    name: str = "default"  # written to <out_dir>/<name>/index.html and report.json
    out_dir: str = "reports"
    comparison: Optional[str] = None  # a `probe compare` folder (comparisons/<name>) of these runs
    images: int = 6  # probe images shown in the image grids
    units: int = 4  # units per model shown with their top exemplars

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) or self.name in (".", ".."):
            raise ConfigError(f"name: '{self.name}' is not allowed; use letters, digits, '_', '-', '.'")
        if not self.runs and not self.sweep:
            raise ConfigError("runs: no runs to report; give runs=[<run dir>, ...] or sweep=<multirun dir>")
        check_range("images", self.images, 1)
        check_range("units", self.units, 0)
