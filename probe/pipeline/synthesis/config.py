"""``probe synthesize``: the stage's configuration (keys under ``synthesis.``), checked in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from probe.pipeline.config import AnalysisStage, check_choice, check_range
from probe.errors import ConfigError


@dataclass
class ParamConfig:
    """How an image is represented while it is optimised."""

    # fourier (spectrum scaled by 1/frequency, as Lucid) | maco (phase only, the magnitude of the run's own
    # training images, Fel et al. 2023; its phases want larger steps: lr 0.3) | pca (coefficients on the principal
    # components of the run's own training images: the image stays in their span) | pixel
    kind: str = "fourier"
    variance: float = 0.999  # pca: the fewest components that explain this share of the training images' variance
    decorrelate: bool = True  # colour decorrelation from the run's own training pixels (identity for greyscale)
    decay_power: float = 1.0  # fourier: spectrum scaled by 1 / frequency ** decay_power
    init_sd: float = 0.01  # standard deviation of the random initial parameters

    def __post_init__(self) -> None:
        check_choice("synthesis.*param.kind", self.kind, ("fourier", "maco", "pca", "pixel"))
        check_range("synthesis.*param.variance", self.variance, 0.0, 1.0, low_open=True)
        check_range("synthesis.*param.decay_power", self.decay_power, 0.0)
        check_range("synthesis.*param.init_sd", self.init_sd, 0.0)


@dataclass
class TransformConfig:
    """Transformation robustness; distances are fractions of the image side, so one default fits 32 and 224 px."""

    enabled: bool = True
    pad: float = 0.06  # pad every side by this fraction (0: off)
    pad_mode: str = "reflect"  # reflect | constant (grey 0.5) | replicate
    jitter: float = 0.06  # random translation up to this fraction, per image (0: off)
    scale: list[float] = field(default_factory=lambda: [0.95, 1.05])  # random zoom range per image ([1, 1]: off)
    rotate: float = 5.0  # random rotation up to +- this many degrees per image (0: off)
    crop: list[float] = field(default_factory=lambda: [1.0, 1.0])  # MACO's random box, [low, high] side fraction ([1, 1]: off)
    noise: float = 0.0  # MACO's pixel noise: Gaussian of this standard deviation plus uniform of this width (0: off)
    copies: int = 1  # transformed copies of each image per step; the objective is their mean

    def __post_init__(self) -> None:
        check_range("synthesis.transforms.pad", self.pad, 0.0, 0.5)
        check_choice("synthesis.transforms.pad_mode", self.pad_mode, ("reflect", "constant", "replicate"))
        check_range("synthesis.transforms.jitter", self.jitter, 0.0, 0.5)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"synthesis.transforms.scale: {list(self.scale)} must be [low, high] with 0 < low <= high")
        check_range("synthesis.transforms.rotate", self.rotate, 0.0, 180.0)
        if len(self.crop) != 2 or not 0 < self.crop[0] <= self.crop[1] <= 1:
            raise ConfigError(f"synthesis.transforms.crop: {list(self.crop)} must be [low, high] with 0 < low <= high <= 1")
        check_range("synthesis.transforms.noise", self.noise, 0.0)
        check_range("synthesis.transforms.copies", self.copies, 1)


@dataclass
class Regularisers:
    """Penalty weights, subtracted from the objective (0: off). Computed on pixels in [0, 1]."""

    l1: float = 0.0  # mean |x - 0.5|
    l2: float = 0.0  # mean (x - 0.5)^2
    tv: float = 0.0  # total variation: mean absolute difference of neighbouring pixels
    blur: float = 0.0  # mean (x - blur(x))^2, blur(x) held constant (Lucid's blur penalty)
    # mean squared whitened coefficient on the training images' principal components (objectives.gaussian_prior)
    prior: float = 0.0

    def __post_init__(self) -> None:
        for k in ("l1", "l2", "tv", "blur", "prior"):
            check_range(f"synthesis.*.reg.{k}", getattr(self, k), 0.0)


@dataclass
class ClassImages:
    enabled: bool = True
    classes: Any = "all"  # all | a count (the first N classes) | a list of class indices
    # logit (default): the unnormalised class score, as Simonyan et al. 2014 (section 2) define class-model
    # images: maximising the log-probability can be achieved by pushing the other classes down instead of
    # making the image more like the class. log_prob (logit - logsumexp) is kept as an explicit alternative.
    objective: str = "logit"  # logit | log_prob
    steps: int = 96
    lr: float = 0.05
    # class images in the span of the training images, with their Gaussian prior: the parametrisation other
    # models recognise best (README, "Feature visualisations that transfer")
    param: ParamConfig = field(default_factory=lambda: ParamConfig(kind="pca"))
    reg: Regularisers = field(default_factory=lambda: Regularisers(prior=0.3))

    def __post_init__(self) -> None:
        check_choice("synthesis.class_images.objective", self.objective, ("logit", "log_prob"))
        check_range("synthesis.class_images.steps", self.steps, 1)
        check_range("synthesis.class_images.lr", self.lr, 0.0, low_open=True)
        _check_selection("synthesis.class_images.classes", self.classes)


@dataclass
class DreamConfig:
    enabled: bool = True
    layer: Optional[str] = None  # None: the middle Conv2d of the model
    images: list[int] = field(default_factory=lambda: [0, 1, 2])  # indices into the run's fixed probe images
    octaves: int = 3
    octave_scale: float = 1.4  # each octave is this much larger than the one before; the last is full size
    steps: int = 10  # gradient steps per octave
    lr: float = 0.015  # step size of the normalised gradient step, in log-odds units (probe.synthesis.dream)
    jitter: int = 2  # random circular shift, in pixels, per image and step
    zoom_frames: int = 4  # zoom-and-repeat frames from the first dream image (0: off)
    zoom: float = 1.1  # zoom factor between frames
    zoom_steps: int = 6  # gradient steps per frame

    def __post_init__(self) -> None:
        check_range("synthesis.dream.octaves", self.octaves, 1)
        check_range("synthesis.dream.octave_scale", self.octave_scale, 1.0)
        check_range("synthesis.dream.steps", self.steps, 1)
        check_range("synthesis.dream.lr", self.lr, 0.0, low_open=True)
        check_range("synthesis.dream.jitter", self.jitter, 0)
        check_range("synthesis.dream.zoom_frames", self.zoom_frames, 0)
        check_range("synthesis.dream.zoom", self.zoom, 1.0)
        check_range("synthesis.dream.zoom_steps", self.zoom_steps, 1)
        for i in self.images:
            check_range("synthesis.dream.images", i, 0)


@dataclass
class Accentuate:
    """Feature accentuation (Hamblin et al. 2024): each channel's top dataset exemplar, optimised for the channel
    while ``weight * mean((x - exemplar)^2)`` keeps it close; needs the activations stage's exemplars."""

    enabled: bool = True
    weight: float = 100.0  # pull towards the exemplar (inf: the exemplar itself)
    steps: int = 48
    lr: float = 0.05

    def __post_init__(self) -> None:
        check_range("synthesis.accentuate.weight", self.weight, 0.0)
        check_range("synthesis.accentuate.steps", self.steps, 1)
        check_range("synthesis.accentuate.lr", self.lr, 0.0, low_open=True)


@dataclass
class Diversity:
    """k channel images per channel, made different by Lucid's diversity term (Olah et al. 2017)."""

    k: int = 1  # images per channel (1: no diversity term)
    weight: float = 1.0  # weight of the Gram-similarity penalty, relative to the channel objective
    layer: Optional[str] = None  # whose Gram matrices are compared (None: the channel's own layer)

    def __post_init__(self) -> None:
        check_range("synthesis.diversity.k", self.k, 1)
        check_range("synthesis.diversity.weight", self.weight, 0.0)


@dataclass
class SynthesisConfig:
    # channel images: every Conv2d by default (a few evenly spaced ones for models with over 20 convs)
    layers: list[str] = field(default_factory=list)
    channels: Any = "all"  # all | a count (the first N channels of each layer) | a list of channel indices
    objective: str = "mean"  # mean (spatial mean) | squared_norm (the lecture's ||h_{l,d}(x)||^2)
    steps: int = 64
    lr: float = 0.05
    batch_size: int = 256  # channel images optimised together in one batch
    image_size: Optional[int] = None  # None: the run's input size
    redirect_relu_steps: int = 16  # Lucid's redirected ReLU for the first steps (0: off)
    on_nan: str = "error"  # error: stop with NumericalError | skip: freeze that image, mark it, go on
    param: ParamConfig = field(default_factory=ParamConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    reg: Regularisers = field(default_factory=Regularisers)
    class_images: ClassImages = field(default_factory=ClassImages)
    dream: DreamConfig = field(default_factory=DreamConfig)
    accentuate: Accentuate = field(default_factory=Accentuate)
    diversity: Diversity = field(default_factory=Diversity)
    color_samples: int = 2000  # training images used for the colour covariance, MACO's magnitude and saturation

    def __post_init__(self) -> None:
        _check_selection("synthesis.channels", self.channels)
        check_choice("synthesis.objective", self.objective, ("mean", "squared_norm"))
        check_range("synthesis.steps", self.steps, 1)
        check_range("synthesis.lr", self.lr, 0.0, low_open=True)
        check_range("synthesis.batch_size", self.batch_size, 1)
        check_range("synthesis.image_size", self.image_size, 8)
        check_range("synthesis.redirect_relu_steps", self.redirect_relu_steps, 0)
        check_choice("synthesis.on_nan", self.on_nan, ("error", "skip"))
        check_range("synthesis.color_samples", self.color_samples, 1)


@dataclass
class SynthesizeStage(AnalysisStage):
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)

    def __post_init__(self) -> None:
        super().__post_init__()


def _check_selection(key: str, value: Any) -> None:
    """``all``, a positive count, or a list of non-negative indices."""
    if value == "all":
        return
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value} is not allowed; allowed: all, a count, or a list of indices")
    if isinstance(value, int):
        check_range(key, value, 1)
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        for v in value:
            check_range(key, v, 0)
        return
    raise ConfigError(f"{key}: '{value}' is not allowed; allowed: all, a count, or a non-empty list of indices")


def select_indices(key: str, value: Any, total: int) -> list[int]:
    """The indices that ``value`` (all | count | list) picks out of ``range(total)``."""
    if value == "all":
        return list(range(total))
    if isinstance(value, int):
        return list(range(min(value, total)))
    bad = [v for v in value if v >= total]
    if bad:
        raise ConfigError(f"{key}: index {bad[0]} is out of range; this layer has {total} (0 to {total - 1})")
    return list(value)
