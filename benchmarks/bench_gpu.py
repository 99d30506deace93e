"""GPU benchmark (CUDA only): ResNet-50 at 224x224, random weights, one batch size for every pass.

- ``inference``: images/s of a plain ``model(x)`` pass (no hooks) in float32 and with probe's fast path
  (channels_last + bf16 autocast), against the full statistics pass (probe.activations.collect, every
  default layer, fast path on); ratios against both plain passes, measured in the same run.
  Target (issue 7): statistics pass >= 0.8x the images/s of the plain pass at the same batch size.
- ``saliency``: vanilla gradient and integrated gradients against a bare forward+backward (float32).
- ``render``: a batched render of N channels of one layer against the same channels one at a time,
  and against torch-lucent's ``render_vis`` when it is installed (``pip install -e .[bench]``).
  Target (issue 5): batched >= 20x faster per channel than Lucent.
Data live on the GPU (the host->device copy is not timed); every timing is bracketed by a synchronise.
``--smoke`` runs every section on the CPU at toy sizes (tests/test_benchmarks.py): it measures
nothing, it keeps the script from breaking between the sessions that have a GPU.

    python benchmarks/bench_gpu.py [--quick | --smoke] [--out results.json]
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

SIZES = {  # ResNet-50 input side, batches and batch size, saliency batch and IG steps, repeats; render side, steps, channels
    "full": dict(side=224, n_batches=20, batch=64, sal_batch=32, ig_steps=32, rounds=3,
                 r_side=128, r_steps=64, r_channels=64, r_single=4),
    "quick": dict(side=224, n_batches=5, batch=64, sal_batch=32, ig_steps=32, rounds=2,
                  r_side=128, r_steps=16, r_channels=16, r_single=2),
    "smoke": dict(side=64, n_batches=1, batch=4, sal_batch=2, ig_steps=2, rounds=1,
                  r_side=32, r_steps=2, r_channels=2, r_single=1),
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, rounds: int) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    _sync()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def inference(dev: torch.device, z: dict) -> dict:
    import torchvision

    from probe.activations import collect
    from probe.hooks import default_layers
    from probe.runtime import autocast, fast_model

    batch, n_batches, side = z["batch"], z["n_batches"], z["side"]
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(dev)
    data = [(torch.randn(batch, 3, side, side, device=dev), torch.randint(0, 1000, (batch,), device=dev))
            for _ in range(n_batches)]
    layers = default_layers(model)

    @torch.no_grad()
    def plain_fp32():
        for x, _ in data:
            model(x)

    fast = fast_model(model, dev)
    data_cl = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]

    @torch.no_grad()
    def plain_fast():
        with autocast(dev):
            for x, _ in data_cl:
                fast(x)

    def stats():
        collect(fast, data_cl, layers, dev, 1000, amp=True)

    def stats_fp32():
        collect(fast, data_cl, layers, dev, 1000, amp=False)

    rounds = z["rounds"]
    t = {"plain_fp32": _best(plain_fp32, rounds), "plain_fast": _best(plain_fast, rounds),
         "stats": _best(stats, rounds), "stats_fp32": _best(stats_fp32, rounds)}
    images = batch * n_batches
    ips = {k: images / v for k, v in t.items()}
    return {"model": "resnet50 (random weights)", "input": [3, side, side], "batch": batch, "images": images,
            "layers": len(layers), **{f"{k}_images_per_s": v for k, v in ips.items()},
            "stats_vs_plain_fast": ips["stats"] / ips["plain_fast"],
            "stats_vs_plain_fp32": ips["stats"] / ips["plain_fp32"],
            "stats_fp32_vs_plain_fp32": ips["stats_fp32"] / ips["plain_fp32"],
            "target": 0.8, "meets_target": ips["stats"] / ips["plain_fast"] >= 0.8}


def saliency(dev: torch.device, z: dict) -> dict:
    import torchvision

    from probe.saliency.methods import MethodSettings, attribute
    from probe.saliency.prepare import attribution_copy

    batch, steps = z["sal_batch"], z["ig_steps"]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, z["side"], z["side"], device=dev)
    model = attribution_copy(torchvision.models.resnet50(weights=None).eval().to(dev), x[:1])
    target = torch.arange(batch, device=dev) % 1000
    s = MethodSettings(ig_steps=steps)

    def fb():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xg).gather(1, target.view(-1, 1)).sum(), xg)

    t_fb = _best(fb, z["rounds"])
    t_vanilla = _best(lambda: attribute("saliency", model, x, target, s), z["rounds"])
    t_fbn = _best(lambda: [fb() for _ in range(steps)], 1)
    t_ig = _best(lambda: attribute("integrated_gradients", model, x, target, s), 1)
    return {"model": "resnet50 (random weights)", "batch": batch, "ig_steps": steps, "forward_backward_s": t_fb,
            "vanilla_s": t_vanilla, "vanilla_ratio": t_vanilla / t_fb, "forward_backward_x_steps_s": t_fbn,
            "ig_s": t_ig, "ig_ratio": t_ig / t_fbn}


def render(dev: torch.device, z: dict) -> dict:
    import torchvision

    from probe.data import IMAGENET_MEAN, IMAGENET_STD
    from probe.synthesis import objectives as O
    from probe.synthesis.param import ImageParam
    from probe.synthesis.render import render as do_render
    from probe.synthesis.transform import Transforms

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(dev)
    layer, size, steps = "layer3", z["r_side"], z["r_steps"]
    n, n_single = z["r_channels"], z["r_single"]

    def go(channels):
        param = ImageParam(len(channels), 3, size, kind="fourier", seeds=list(channels), device=dev)
        tr = Transforms(pad=12, pad_mode="constant", jitter=4, scale=(0.9, 1.1), rotate=10, final="resize", out_size=size)
        return do_render(model, O.channel(layer, list(channels)), param, steps=steps, lr=0.05, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, transforms=tr, seed=0)

    t_batch = _best(lambda: go(range(n)), 1)
    t_single = _best(lambda: [go([c]) for c in range(n_single)], 1)
    out = {"model": "resnet50 (random weights)", "layer": layer, "size": size, "steps": steps, "channels": n,
           "batched_s": t_batch, "batched_s_per_channel": t_batch / n, "one_at_a_time_s_per_channel": t_single / n_single,
           "batched_speedup": (t_single / n_single) / (t_batch / n)}
    from bench_synthesis import lucent_render

    try:
        import lucent  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a benchmark-only extra, with stale pins)
        out["lucent_error"] = str(e)
        return out
    # render_vis leaves a hook on every module: a fresh copy per call
    t_lucent = _best(lambda: [lucent_render(copy.deepcopy(model), c, steps, size, layer) for c in range(n_single)], 1)
    out.update({"lucent_s_per_channel": t_lucent / n_single, "batched_vs_lucent": (t_lucent / n_single) / (t_batch / n)})
    return out


def run(mode: str = "full") -> dict:
    """Every section at the sizes of ``mode`` (SIZES); on CUDA, except ``smoke`` (CPU)."""
    if mode == "smoke":
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.backends.cudnn.benchmark = True  # as probe outside deterministic mode
    else:
        raise SystemExit("bench_gpu: no CUDA device")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    out = {"device": name, "torch": torch.__version__, "mode": mode}
    for section, fn in (("inference", inference), ("saliency", saliency), ("render", render)):
        t = time.perf_counter()
        try:
            out[section] = fn(dev, SIZES[mode])
        except Exception as e:  # noqa: BLE001  (report what failed, keep the other figures)
            out[section] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        out[section]["wall_s"] = time.perf_counter() - t
        print(f"{section}: {json.dumps(out[section], sort_keys=True)}", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    res = run("smoke" if "--smoke" in sys.argv else "quick" if "--quick" in sys.argv else "full")
    text = json.dumps(res, indent=2, sort_keys=True)
    if "--out" in sys.argv:
        with open(sys.argv[sys.argv.index("--out") + 1], "w") as f:
            f.write(text + "\n")
    print(text)
