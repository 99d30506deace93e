"""Configuration of the saliency stage (``probe saliency run=<run dir> saliency.methods=[...]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from probe.config import AnalysisStage, check_choice, check_range

METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop", "grad_cam",
           "occlusion")
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
    gradcam_layer: Optional[str] = None  # None: the last Conv2d whose output is larger than 1x1
    occlusion_window: float = 0.125  # window side as a fraction of the image side
    occlusion_stride: float = 0.0625  # stride as a fraction of the image side
    occlusion_baseline: str = "zeros"
    auc_steps: int = 16  # deletion / insertion curve points (plus the start)
    # what deleted pixels become and what insertion starts from. zeros (black) as in RISE's deletion game;
    # on digits a blurred digit stays recognisable, so blur barely separates any order from chance
    substrate: str = "zeros"
    blur_sigma: float = 0.1  # gaussian blur sigma (substrate and baselines) as a fraction of the image side
    eval_batch_size: int = 512  # perturbed images per forward pass in deletion / insertion
    randomisation: bool = True
    randomisation_methods: list[str] = field(default_factory=lambda: list(DEFAULT_RANDOMISATION))
    overlays: bool = True

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
        check_choice("saliency.substrate", self.substrate, BASELINES)
        check_range("saliency.blur_sigma", self.blur_sigma, 0.0, 1.0, low_open=True)
        check_range("saliency.eval_batch_size", self.eval_batch_size, 1)


@dataclass
class SaliencyStage(AnalysisStage):
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
