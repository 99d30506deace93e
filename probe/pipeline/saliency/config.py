"""Configuration of the saliency stage (``probe saliency run=<run dir> saliency.methods=[...]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from probe.errors import check_choice, check_range
from probe.pipeline.config import AnalysisStage
from probe.errors import ConfigError
from probe.saliency.methods import METHODS as LIBRARY_METHODS

METHODS = tuple(LIBRARY_METHODS)
BASELINES = ("zeros", "blur", "mean")  # zeros: black pixels; mean: the dataset mean image (0 once normalised)
DEFAULT_RANDOMISATION = ["saliency", "integrated_gradients", "grad_cam", "guided_backprop"]


@dataclass
class SaliencyConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    batch_size: int = 64  # images per attribution call (halved and retried on CUDA out-of-memory)
    ig_steps: int = 32
    ig_baseline: str = "zeros"
    # expanded (image x step) rows per forward pass; on a CPU, passes of the batch's size ran faster per row
    # than passes of 512 (benchmarks/bench_saliency.py); on a GPU raise it
    ig_internal_batch_size: int = 64
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15  # noise stdev as a fraction of the input range (max - min)
    smoothgrad_batch_size: int = 16  # noisy copies per forward pass (Captum's nt_samples_batch_size)
    # None: the output of the last convolutional block after its rectifier, larger than 1x1 (Selvaraju et al. 2017,
    # section 3; see probe.saliency.prepare.default_gradcam_layer); written to metrics.json as gradcam_layer
    gradcam_layer: Optional[str] = None
    occlusion_window: float = 0.125  # window side as a fraction of the image side
    occlusion_stride: float = 0.0625  # stride as a fraction of the image side
    occlusion_baseline: str = "zeros"
    # deletion / insertion AUC, one convention (RISE, Petsiuk et al. 2018, section 4.1): the softmax probability of
    # the target over the fraction of pixels affected in [0, 1], trapezoid rule, so AUC in [0, 1] for any auc_steps
    auc_steps: int = 16  # deletion / insertion curve points (plus the start)
    # random pixel orders per image: the null distribution a method's AUC is compared with (paired over images,
    # sign-flip permutation p, Holm over methods x {deletion, insertion}); each order costs a method's curves,
    # and the between-image spread, not the orders, dominates the test's interval
    random_orders: int = 16
    # what deleted pixels become and what insertion starts from. zeros (black) as in RISE's deletion game;
    # on digits a blurred digit stays recognisable, so blur barely separates any order from chance
    substrate: str = "zeros"
    blur_sigma: float = 0.1  # gaussian blur sigma (substrate and baselines) as a fraction of the image side
    eval_batch_size: int = 512  # perturbed images per forward pass in deletion / insertion
    randomisation: bool = True
    randomisation_methods: list[str] = field(default_factory=lambda: list(DEFAULT_RANDOMISATION))
    overlays: bool = True
    # ROAD (Rong et al. 2022, probe/saliency/road.py): fractions of pixels removed by noisy linear imputation,
    # most and least relevant first; road_noise is the imputation noise's std on [0, 1] pixels (the paper's 0.01)
    road: bool = True
    road_fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    road_noise: float = 0.01
    mprt_variant: bool = True  # Efficient MPRT (Hedström et al. 2023, probe/saliency/mprt.py)

    def __post_init__(self) -> None:
        if not self.methods:
            check_choice("saliency.methods", "[]", METHODS)
        for m in self.methods:
            check_choice("saliency.methods", m, METHODS)
        for m in self.randomisation_methods:
            check_choice("saliency.randomisation_methods", m, METHODS)
        check_range("saliency.batch_size", self.batch_size, 1)
        check_range("saliency.ig_steps", self.ig_steps, 1)
        check_choice("saliency.ig_baseline", self.ig_baseline, BASELINES)
        check_range("saliency.ig_internal_batch_size", self.ig_internal_batch_size, 1)
        check_range("saliency.smoothgrad_samples", self.smoothgrad_samples, 1)
        check_range("saliency.smoothgrad_noise", self.smoothgrad_noise, 0.0, 1.0, low_open=True)
        check_range("saliency.smoothgrad_batch_size", self.smoothgrad_batch_size, 1)
        check_range("saliency.occlusion_window", self.occlusion_window, 0.0, 1.0, low_open=True)
        check_range("saliency.occlusion_stride", self.occlusion_stride, 0.0, 1.0, low_open=True)
        check_choice("saliency.occlusion_baseline", self.occlusion_baseline, BASELINES)
        check_range("saliency.auc_steps", self.auc_steps, 1)
        check_range("saliency.random_orders", self.random_orders, 2)
        check_choice("saliency.substrate", self.substrate, BASELINES)
        check_range("saliency.blur_sigma", self.blur_sigma, 0.0, 1.0, low_open=True)
        check_range("saliency.eval_batch_size", self.eval_batch_size, 1)
        if not self.road_fractions:
            raise ConfigError("saliency.road_fractions: [] is empty; give fractions of pixels to remove in [0, 1)")
        for f in self.road_fractions:  # removing every pixel would leave nothing to impute from
            if not 0.0 <= f < 1.0:
                raise ConfigError(f"saliency.road_fractions: {f} is out of range; each must be in [0, 1)")
        if any(b <= a for a, b in zip(self.road_fractions, self.road_fractions[1:])):
            raise ConfigError(f"saliency.road_fractions: {list(self.road_fractions)} must be strictly increasing")
        check_range("saliency.road_noise", self.road_noise, 0.0, 1.0)


@dataclass
class SaliencyStage(AnalysisStage):
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
