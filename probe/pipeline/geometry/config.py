"""Configuration of the geometry stage (its keys under ``geometry.``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from probe.pipeline.config import AnalysisStage, check_choice, check_range
from probe.errors import ConfigError


@dataclass
class ShiftConfig:
    """Translations of the probe images, in input pixels, along each axis, with each border mode."""

    shifts: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    axes: list[str] = field(default_factory=lambda: ["x", "y"])
    # circular: torch.roll; zero: the image moves and black (in pixel space) comes in
    modes: list[str] = field(default_factory=lambda: ["circular", "zero"])

    def __post_init__(self) -> None:
        if not self.shifts or 0 in self.shifts:
            raise ConfigError(f"geometry.shift.shifts: {self.shifts} must be a non-empty list of non-zero pixel shifts")
        for a in self.axes:
            check_choice("geometry.shift.axes", a, ("x", "y"))
        for m in self.modes:
            check_choice("geometry.shift.modes", m, ("circular", "zero"))
        if not self.axes or not self.modes:
            raise ConfigError("geometry.shift.axes and geometry.shift.modes must not be empty")


@dataclass
class InvarianceConfig:
    """Further transforms for the invariance table (pixel space, black fills what comes in)."""

    rotations: list[float] = field(default_factory=lambda: [-10.0, -5.0, 5.0, 10.0])  # degrees
    scales: list[float] = field(default_factory=lambda: [0.9, 1.1])  # zoom factors

    def __post_init__(self) -> None:
        for r in self.rotations:
            check_range("geometry.invariance.rotations", abs(r), 0.0, 180.0)
        for s in self.scales:
            check_range("geometry.invariance.scales", s, 0.0, 10.0, low_open=True)


@dataclass
class ErfConfig:
    mass: float = 0.95  # the ERF is the smallest centred square (disc) holding this share of |gradient|
    noise_images: int = 16  # random N(0, 1) inputs (in normalised space), as in Luo et al. 2016; 0: none

    def __post_init__(self) -> None:
        check_range("geometry.erf.mass", self.mass, 0.0, 1.0, low_open=True)
        check_range("geometry.erf.noise_images", self.noise_images, 0)


@dataclass
class GeometryConfig:
    layers: list[str] = field(default_factory=list)  # []: every conv, linear and pooling layer
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
    erf: ErfConfig = field(default_factory=ErfConfig)
    dynamics: bool = True  # first-layer filters, dead fraction and sparsity per snapshot (train.snapshot_epochs)
    dynamics_channels: int = 4  # synthetic images per snapshot: the first channels of the middle conv layer
    dynamics_steps: int = 48  # their optimisation steps (0: no synthetic images)
    figures: bool = True

    def __post_init__(self) -> None:
        check_range("geometry.dynamics_channels", self.dynamics_channels, 0)
        check_range("geometry.dynamics_steps", self.dynamics_steps, 0)


@dataclass
class GeometryStage(AnalysisStage):
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
