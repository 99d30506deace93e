"""Benchmark: minibatch CKA of every layer pair of two models (probe.compare) against the two models'
plain forward passes over the same images.

Cases (random weights, random images; default_layers of each model, so every pair of conv, linear and pooling
layers, each model with itself and with the other):

- ``resnet_small~vgg_small``: probe's two small nets on digits-size input, 1x32x32;
- ``resnet18~resnet18``: two torchvision ResNet-18 (different random initialisations) at 3x64x64.

Per case, in interleaved rounds: seconds for ``model_a(x); model_b(x)`` over every batch (no hooks, no grad,
eval) and for ``compare`` (hooks, a float32 Gram per layer and batch, U-centring and the all-pairs product in
float64), each the best of its rounds; ``ratio`` = compare / plain (target <= 1.5 on a 2-core CPU), and
``ratio_median`` the median over rounds of the ratio within a round (the machine is shared: its speed
drifts between rounds more than within one).

``profile`` (per case, one batch, best of 3, for batch sizes 64, 128, 256): what one minibatch costs, split into
the plain forward of both models, the forward with hooks that do nothing, the Grams of every layer in float32
(the default) and in float64, and the U-centring plus the all-pairs product; ``gram_precision``: the largest
difference between the CKA matrices from float32 and from float64 Grams over a few batches. Then the peak RSS
of a fresh process that runs ``compare`` over N and 4 N images (memory must not grow with the images).

    python benchmarks/bench_similarity.py [--quick] [--threads T] [--batch B]
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CASES = {  # name: (model sources, channels, size)
    "resnet_small~vgg_small": (("resnet_small", "vgg_small"), 1, 32),
    "resnet18~resnet18": (("resnet18", "resnet18"), 3, 64),
}
IMAGES = 5000
BATCH = 64  # the compare stage's default data.batch_size


def build(case: str) -> dict[str, torch.nn.Module]:
    from probe.models import build as build_model

    sources, ch, _ = CASES[case]
    models = {}
    for i, src in enumerate(sources):
        torch.manual_seed(i)
        models[f"m{i}_{src}"] = build_model(src, in_channels=ch, num_classes=10).eval()
    return models


def images(case: str, n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    _, ch, size = CASES[case]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch, n - i), ch, size, size, generator=g) for i in range(0, n, batch)]


@torch.no_grad()
def plain(models: dict, data: list[torch.Tensor]) -> None:
    for x in data:
        for m in models.values():
            m(x)


def similarity(models: dict, data: list[torch.Tensor], batch: int, precision: str = "float32"):
    from probe.similarity import compare

    return compare(models, data, batch_size=batch, precision=precision)


def best(fn, rounds: int = 3) -> float:
    fn()
    t = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


@torch.no_grad()
def profile(case: str, batch: int, rounds: int = 3) -> dict:
    """The cost of one minibatch of ``batch`` images, split into its parts (seconds, best of ``rounds``)."""
    from probe.hooks import Capture, default_layers, layer_outputs
    from probe.similarity.cka import CKA, centred_gram

    models = build(case)
    x = images(case, batch, batch)[0]
    layers = {n: default_layers(m) for n, m in models.items()}
    outs = {f"{n}/{k}": v for n, m in models.items() for k, v in layer_outputs(m, x, layers[n])[1].items()}

    def hooked():
        with contextlib.ExitStack() as stack:
            for n, m in models.items():
                stack.enter_context(Capture(m, layers[n], fn=lambda name, out: None))
            plain(models, [x])

    acc = CKA()
    work = acc._work
    grams = {k: centred_gram(v, "float32", work) for k, v in outs.items()}
    acc.update_grams(grams)
    r = {"batch": batch, "keys": len(outs), "features": sum(v[0].numel() for v in outs.values()),
         "forward_s": best(lambda: plain(models, [x]), rounds),
         "forward_hooks_s": best(hooked, rounds),
         "gram_float32_s": best(lambda: [centred_gram(v, "float32", work) for v in outs.values()], rounds),
         "gram_float64_s": best(lambda: [centred_gram(v, "float64") for v in outs.values()], rounds),
         "ucentre_product_s": best(lambda: acc.update_grams(grams), rounds)}
    r["gram_vs_forward"] = r["gram_float32_s"] / r["forward_s"]
    r["predicted_ratio"] = (r["forward_hooks_s"] + r["gram_float32_s"] + r["ucentre_product_s"]) / r["forward_s"]
    return r


def gram_precision(case: str, batches: int = 4, batch: int = 64) -> float:
    """Largest |CKA(float32 Grams) - CKA(float64 Grams)| over every layer pair, ``batches`` batches."""
    import numpy as np

    models, data = build(case), images(case, batches * batch, batch, seed=1)
    f32 = similarity(models, data, batch, "float32").cka.matrices()[0]
    f64 = similarity(models, data, batch, "float64").cka.matrices()[0]
    return float(np.nanmax(np.abs(f32 - f64)))


def time_case(case: str, n: int, batch: int, rounds: int) -> dict:
    models = build(case)
    data = images(case, n, batch)
    plain(models, data[:1])
    similarity(models, data[:1], batch)
    plain_t, sim_t = [], []
    for _ in range(rounds):  # interleaved: both see the same drift of a shared machine
        t = time.perf_counter(); plain(models, data); plain_t.append(time.perf_counter() - t)
        t = time.perf_counter(); sim = similarity(models, data, batch); sim_t.append(time.perf_counter() - t)
    return {"images": n, "batch": batch, "keys": len(sim.cka.keys), "pairs": len(sim.result()),
            "batches": sim.cka.batches, "plain_s": min(plain_t), "compare_s": min(sim_t),
            "ratio": min(sim_t) / min(plain_t), "ratio_median": statistics.median(s / p for s, p in zip(sim_t, plain_t)),
            "ratios": [s / p for s, p in zip(sim_t, plain_t)], "target": 1.5}


def peak_rss_mb(case: str, n: int, batch: int) -> float:
    """Max RSS of a fresh process that runs compare over ``n`` images made batch by batch."""
    code = ("import resource, sys, torch; sys.path.insert(0, %r); import bench_similarity as b; torch.set_num_threads(%d); "
            "models = b.build(%r); _, ch, s = b.CASES[%r]; "
            "g = torch.Generator().manual_seed(0); "
            "data = (torch.randn(%d, ch, s, s, generator=g) for _ in range(%d)); "
            "from probe.similarity import compare; compare(models, data, batch_size=%d); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)") % (
        os.path.dirname(os.path.abspath(__file__)), torch.get_num_threads(), case, case, batch, n // batch, batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def run(quick: bool = False, batch: int = BATCH) -> dict:
    """Figures for every case. ``quick`` is a smoke run for tests (32 images in minibatches of 8, one round, the
    memory runs for the small case only): its figures do not answer the target."""
    batch = 8 if quick else batch
    n = 32 if quick else IMAGES
    result = {"threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0], "quick": quick, "cases": {}}
    for case in CASES:
        r = time_case(case, n, batch, 1 if quick else 3)
        print(f"{case}: plain {r['plain_s']:.2f}s, compare {r['compare_s']:.2f}s, ratio {r['ratio']:.2f}",
              file=sys.stderr, flush=True)
        r["profile"] = [profile(case, b, 1 if quick else 3) for b in ((batch,) if quick else (64, 128, 256))]
        r["gram_precision"] = gram_precision(case, 2 if quick else 4, batch)
        if not quick or case == next(iter(CASES)):
            mem_n = 2 * batch if quick else 20 * batch
            small, big = peak_rss_mb(case, mem_n, batch), peak_rss_mb(case, 4 * mem_n, batch)
            r.update({"mem_images": [mem_n, 4 * mem_n], "peak_rss_mb": [small, big], "mem_ratio": big / small})
        result["cases"][case] = r
    return result


if __name__ == "__main__":
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    b = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else BATCH
    res = run(quick="--quick" in sys.argv, batch=b)
    print(f"threads {res['threads']}, load average {res['load_avg_1min']:.1f}")
    print(f"{'case':24} {'images':>6} {'batch':>5} {'keys':>4} {'plain s':>8} {'compare s':>9} {'ratio':>6} "
          f"{'median':>6}   {'RSS MB at N, 4N':>16} {'f32-f64':>8}")
    for name, r in res["cases"].items():
        rss = r.get("peak_rss_mb", [float("nan")] * 2)
        print(f"{name:24} {r['images']:>6} {r['batch']:>5} {r['keys']:>4} {r['plain_s']:>8.2f} {r['compare_s']:>9.2f} "
              f"{r['ratio']:>6.2f} {r['ratio_median']:>6.2f}   {rss[0]:>7.0f} {rss[1]:>7.0f}  "
              f"{r['gram_precision']:>8.1e}")
    print(f"\n{'profile: case':24} {'batch':>5} {'fwd s':>7} {'hooks s':>7} {'gram32':>7} {'gram64':>7} {'U+prod':>7} "
          f"{'pred. ratio':>11}")
    for name, r in res["cases"].items():
        for p in r["profile"]:
            print(f"{name:24} {p['batch']:>5} {p['forward_s']:>7.3f} {p['forward_hooks_s']:>7.3f} "
                  f"{p['gram_float32_s']:>7.3f} {p['gram_float64_s']:>7.3f} {p['ucentre_product_s']:>7.3f} "
                  f"{p['predicted_ratio']:>11.2f}")
    print(json.dumps(res, indent=2))
