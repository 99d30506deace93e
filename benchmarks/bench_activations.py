"""Benchmark: the full statistics pass (probe.activations.collect) against a plain inference pass.

In one run, per model: seconds for a plain ``model(x)`` pass over the same batches (no hooks) and
for the statistics pass (every default layer: sums, squares, min, max, histogram, class sums,
top-k exemplars), in 9 interleaved rounds; the ratio is the median over rounds of stats / plain
in the same round (the machine's speed drifts between rounds, not within one). ``stride4``: the
statistics pass with ``hist_stride=4`` (histograms and quantiles from every 4th position).
``no_rectified``: the statistics pass without the rectified-response accumulators (every layer treated as
having none: what the pass cost before dead units and selectivity moved to the rectified response), so
``rectified_cost`` (median of full / no_rectified per round) is the price of that accumulator. Then
the peak RSS of a fresh subprocess that streams N and 10 N images through the statistics pass.
Targets (issue 3): ratio <= 1.3 on CPU; peak memory at 10 N within 5% of that at N.

    python benchmarks/bench_activations.py [--quick] [--threads T]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

CASES = {  # name: (model, channels, size, batch, images for timing, images for memory (N))
    "resnet_small": ("resnet_small", 1, 32, 64, 1280, 640),
    "resnet18@64": ("resnet18", 3, 64, 64, 640, 128),
}


def build(model: str, channels: int):
    from probe.models import build as build_model

    return build_model(model, in_channels=channels, num_classes=10).eval()


def batches(n: int, channels: int, size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch):
        m = min(batch, n - i)
        yield torch.randn(m, channels, size, size, generator=g), torch.randint(0, 10, (m,), generator=g)


def stats_pass(model, data, layers, hist_stride: int = 1, rectified: dict | None = None):
    from probe.activations import collect

    return collect(model, data, layers, torch.device("cpu"), 10, hist_stride=hist_stride, rectified=rectified)


@torch.no_grad()
def plain_pass(model, data):
    for x, _ in data:
        model(x)


def time_case(name: str, quick: bool) -> dict:
    from probe.hooks import default_layers

    model_name, ch, size, batch, n, _ = CASES[name]
    n = n // 4 if quick else n
    model = build(model_name, ch)
    data = list(batches(n, ch, size, batch))
    layers = default_layers(model)
    plain_pass(model, data[:1])
    stats_pass(model, data[:1], layers)
    stats_pass(model, data[:1], layers, rectified={})
    rectified = sum(s.rectified is not None for s in stats_pass(model, data[:1], layers).layers.values())
    plain, full, strided, norect = [], [], [], []
    for _ in range(3 if quick else 9):  # interleaved rounds: the machine's speed drifts between rounds
        t = time.perf_counter(); plain_pass(model, data); plain.append(time.perf_counter() - t)
        t = time.perf_counter(); stats_pass(model, data, layers); full.append(time.perf_counter() - t)
        t = time.perf_counter(); stats_pass(model, data, layers, 4); strided.append(time.perf_counter() - t)
        t = time.perf_counter(); stats_pass(model, data, layers, rectified={}); norect.append(time.perf_counter() - t)
    return {"images": n, "batch": batch, "layers": len(layers), "rectified_layers": rectified,
            "plain_s": min(plain), "stats_s": min(full),
            "ratio": median_ratio(full, plain), "ratios": [f / p for f, p in zip(full, plain)],
            "stats_stride4_s": min(strided), "ratio_stride4": median_ratio(strided, plain),
            "no_rectified_s": min(norect), "ratio_no_rectified": median_ratio(norect, plain),
            "rectified_cost": median_ratio(full, norect)}


def median_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of time / baseline of the same round."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def peak_rss_mb(name: str, n: int) -> float:
    """Max RSS of a fresh process that streams ``n`` images through the statistics pass."""
    code = ("import resource, sys, torch; sys.path.insert(0, %r); import bench_activations as b; "
            "from probe.hooks import default_layers; torch.set_num_threads(%d); "
            "m, ch, s, bs, _, _ = b.CASES[%r]; model = b.build(m, ch); "
            "b.stats_pass(model, b.batches(%d, ch, s, bs), default_layers(model)); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)") % (
        os.path.dirname(os.path.abspath(__file__)), torch.get_num_threads(), name, n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def run(quick: bool = False) -> dict:
    result = {"threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0], "cases": {}}
    for name, case in CASES.items():
        r = time_case(name, quick)
        n = case[5] // (4 if quick else 1)
        small, big = peak_rss_mb(name, n), peak_rss_mb(name, 10 * n)
        r.update({"mem_images": [n, 10 * n], "peak_rss_mb": [small, big], "mem_ratio": big / small})
        result["cases"][name] = r
    return result


if __name__ == "__main__":
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    res = run(quick="--quick" in sys.argv)
    print(f"threads {res['threads']}, load average {res['load_avg_1min']:.1f}")
    print(f"{'case':14} {'images':>6} {'plain s':>8} {'stats s':>8} {'ratio':>6} {'stride4':>8} {'no rect':>8} "
          f"{'rect cost':>9}   {'RSS MB at N, 10N':>18} {'ratio':>6}")
    for name, r in res["cases"].items():
        print(f"{name:14} {r['images']:>6} {r['plain_s']:>8.2f} {r['stats_s']:>8.2f} {r['ratio']:>6.2f}   "
              f"{r['ratio_stride4']:>8.2f} {r['ratio_no_rectified']:>8.2f} {r['rectified_cost']:>9.3f}   "
              f"{r['peak_rss_mb'][0]:>8.0f} {r['peak_rss_mb'][1]:>8.0f} {r['mem_ratio']:>6.3f}   (N={r['mem_images'][0]})")
    print(json.dumps(res, indent=2))
