"""Benchmark: CRAFT concept extraction for one layer against the model's plain forward pass.

CRAFT (Fel et al., "CRAFT: Concept Recursive Activation FacTorization for Explainability", CVPR 2023,
arXiv:2211.10154), with the library :mod:`probe.concepts` used as the concepts stage uses it
(``probe/pipeline/concepts/stage.py``). **Extraction** is what the stage does to get the concepts and the
coefficients of every image, in three parts:

1. ``sample_s``: every batch run up to the layer (``probe.hooks.layer_outputs(..., output=False)``, as the
   stage's ``layer_maps``) and every spatial position offered to ``ActivationSample(max_samples, seed=0)``;
2. ``fit_s``: ``fit_concepts(A, k, seed=0)`` (the NMF) on the kept rows;
3. ``transform_s``: every batch run up to the layer again and ``Concepts.transform`` of all its positions.

It leaves out the stage's summaries, crops, heatmaps, k-curve and stability. ``plain_s`` is the model's full
forward pass (to its output) over the same batches, eval mode, ``torch.no_grad``; ``ratio`` =
``extraction_s / plain_s``. ``importance`` (CRAFT Sec. 3.2: the layer pass and coefficients of a few images,
then ``sobol_importance`` through ``head_from_layer``) is timed on its own and is not in the ratio.

Cases, layer ``layer3`` in both:

- ``resnet_small``: probe's ``resnet_small`` on the digits test split as the stage loads it (the data defaults:
  32x32, 1 channel, train-split normalisation), batch 64 (``data.batch_size``); trained weights from
  ``artifacts/resnet_small/model.safetensors`` when that file exists, else the random initialisation;
- ``resnet18_64px``: torchvision's ResNet-18 (``weights=None``: random) on 5,000 digits (the 1,797 cycled),
  resized to 64x64, grey repeated to RGB, ImageNet normalisation; batch 128.

Timing: a warm-up on one batch, then interleaved rounds (plain, then extraction); ``plain_s`` is the best
round, the extraction parts come from the round with the best extraction total, and ``ratios`` are the ratios
within each round, ``ratio_median`` their median (the machine may be shared). torch and the BLAS that the NMF
uses both run on ``--threads`` threads (2).

    python benchmarks/bench_concepts.py [--quick] [--threads T] [--out benchmarks/results/concepts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from threadpoolctl import threadpool_info, threadpool_limits

from probe.concepts import ActivationSample, fit_concepts, head_from_layer, relative_error, sobol_importance
from probe.data import load_data
from probe.hooks import check_layers, layer_outputs
from probe.models import build
from probe.pipeline.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "artifacts" / "resnet_small" / "model.safetensors"
LAYER = "layer3"
RANDOM = "random initialisation (torch.manual_seed(0))"
SIZES = {  # images: resnet18's count and a cap on the digits test split; size: resnet18's input side
    False: {"images": 5000, "size": 64, "max_samples": 20000, "k": 10, "importance_images": 32, "n_designs": 32,
            "rounds": 3},
    True: {"images": 256, "size": 32, "max_samples": 2000, "k": 4, "importance_images": 4, "n_designs": 8,
           "rounds": 1},
}


def resnet_small_case(s: dict) -> dict:
    torch.manual_seed(0)
    trained = WEIGHTS.is_file()
    model = build("resnet_small", in_channels=1, num_classes=10, weights=str(WEIGHTS) if trained else None)
    x, y = load_data(DataConfig(), channels=1).test.tensors
    return {"model": model, "x": x[: s["images"]], "y": y[: s["images"]], "batch": 64,
            "info": {"model": "probe resnet_small", "weights": str(WEIGHTS.relative_to(ROOT)) if trained else RANDOM,
                     "images_from": "digits test split (data defaults: 32x32, 1 channel, train-split normalisation)"}}


def resnet18_case(s: dict) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x, y = load_data(DataConfig(image_size=s["size"], channels=3, normalize="imagenet"), channels=3).all.tensors
    cycle = torch.arange(s["images"]) % len(x)
    return {"model": model, "x": x[cycle], "y": y[cycle], "batch": 128,
            "info": {"model": "torchvision resnet18", "weights": RANDOM,
                     "images_from": f"digits, all {len(x)} cycled to {s['images']}, bilinear to {s['size']}x{s['size']}, "
                                    f"grey repeated to RGB, ImageNet normalisation"}}


CASES = {"resnet_small": resnet_small_case, "resnet18_64px": resnet18_case}


@torch.no_grad()
def layer_maps(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output, the model run only up to it (the stage's ``layer_maps``)."""
    return layer_outputs(model, x, [LAYER], output=False)[1][LAYER].float()


@torch.no_grad()
def plain(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for x in batches:
        model(x)


def extraction(model: torch.nn.Module, batches: list[torch.Tensor], max_samples: int, k: int):
    """Seconds of each part of the extraction, the sample and the concepts."""
    t0 = time.perf_counter()
    sample = ActivationSample(max_samples, seed=0)
    for x in batches:
        sample.update(layer_maps(model, x))
    t1 = time.perf_counter()
    concepts = fit_concepts(sample.matrix(), k, seed=0)
    t2 = time.perf_counter()
    for x in batches:
        concepts.transform_maps(layer_maps(model, x))
    t3 = time.perf_counter()
    times = {"sample_s": t1 - t0, "fit_s": t2 - t1, "transform_s": t3 - t2, "extraction_s": t3 - t0}
    return times, sample, concepts


def importance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, concepts, n_designs: int,
               batch: int) -> dict:
    """Seconds of CRAFT's Sobol importance of the concepts for the images ``x`` (labels ``y``), as the stage
    computes it: their layer maps and coefficients, then ``sobol_importance`` through ``head_from_layer``."""
    t0 = time.perf_counter()
    acts = layer_maps(model, x)
    U = torch.from_numpy(concepts.transform_maps(acts))
    head = head_from_layer(model, LAYER, x[:1])
    sobol_importance(head, U, torch.from_numpy(concepts.W), y, n_designs=n_designs, seed=0,
                     spatial=tuple(acts.shape[2:]), batch_size=batch)
    seconds = time.perf_counter() - t0
    return {"images": len(x), "n_designs": n_designs, "head_passes": len(x) * n_designs * (concepts.k + 1),
            "importance_s": seconds, "s_per_image": seconds / len(x)}


def time_case(case: dict, s: dict) -> dict:
    model, x, y, batch = case["model"], case["x"], case["y"], case["batch"]
    check_layers(model, [LAYER], key="layer")
    batches = list(x.split(batch))
    plain(model, batches[:1])  # warm-up
    extraction(model, batches[:1], s["max_samples"], s["k"])
    plain_t, extract_t = [], []
    for _ in range(s["rounds"]):  # interleaved: both see the same drift of a shared machine
        t0 = time.perf_counter()
        plain(model, batches)
        plain_t.append(time.perf_counter() - t0)
        times, sample, concepts = extraction(model, batches, s["max_samples"], s["k"])
        extract_t.append(times)
    best = min(extract_t, key=lambda t: t["extraction_s"])
    ratios = [e["extraction_s"] / p for e, p in zip(extract_t, plain_t)]
    A = sample.matrix()
    return {**case["info"], "layer": LAYER, "images": len(x), "input": list(x.shape[1:]), "batch": batch,
            "layer_shape": list(layer_maps(model, x[:1]).shape[1:]), "max_samples": s["max_samples"],
            "rows_seen": sample.seen, "rows_kept": len(A), "k": s["k"],
            "reconstruction_error": relative_error(A, concepts.U, concepts.W), "rounds": s["rounds"],
            "plain_s": min(plain_t), **best, "ratio": best["extraction_s"] / min(plain_t),
            "ratio_median": statistics.median(ratios), "ratios": ratios,
            "importance": importance(model, x[: s["importance_images"]], y[: s["importance_images"]], concepts,
                                     s["n_designs"], batch)}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def run(quick: bool = False) -> dict:
    """Figures for every case. ``quick`` is a smoke run for tests (256 images, 32 px, 2,000 rows, k = 4, one
    round): its figures do not answer the question."""
    s = SIZES[quick]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "blas_threads": {i["internal_api"]: i["num_threads"] for i in threadpool_info()},
              "cpu": cpu_model(), "load_avg_1min": os.getloadavg()[0], "quick": quick, "cases": {}}
    for name, make in CASES.items():
        r = time_case(make(s), s)
        print(f"{name}: plain {r['plain_s']:.2f}s, extraction {r['extraction_s']:.2f}s (sample {r['sample_s']:.2f}, "
              f"fit {r['fit_s']:.2f}, transform {r['transform_s']:.2f}), ratio {r['ratio']:.2f}; importance "
              f"{r['importance']['s_per_image']:.3f}s per image", file=sys.stderr, flush=True)
        result["cases"][name] = r
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch and BLAS threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concepts.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        r = run(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
