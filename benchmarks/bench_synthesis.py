"""Batched feature visualisation vs one channel at a time vs torch-lucent's ``render_vis``.

All three render the same channels of ResNet-18 ``layer2`` (random weights, ImageNet normalisation)
for the same number of steps at the same image size (64 x 64, Fourier parametrisation with the same
colour matrix, Adam lr 0.05, Lucent-like transforms). "Activation reached" is measured the same way
for all: the channel's spatial mean on the final 64 x 64 image, no transforms, eval mode.

    python benchmarks/bench_synthesis.py [--param fourier|maco] [--quick] [--channels N] [--lucent-channels M] [--threads T]

``--param maco`` renders probe's batched and one-at-a-time images with MACO's parametrisation (phase only,
a fixed magnitude: here that of 1/f noise images, since no dataset is downloaded) and MACO's transforms (a
random crop of 80-100% of the side per step, noise 0.05; one crop, so every way does one forward pass per step) and lr 0.3; Lucent stays on its own Fourier ``render_vis``
(it has no MACO), so that row compares probe's MACO with the Lucent a user would otherwise run. The figures
are written to ``benchmarks/results/synthesis_<param>.json``.

By default all 128 channels are rendered batched and one at a time, and Lucent renders the first
16 of them (it takes about a second per channel); per-channel figures compare like with like.
Times are wall clock and process CPU time (the latter is steadier on a shared machine).

Lucent is a benchmark-only extra: ``pip install --no-deps torch-lucent kornia==0.4.1 && pip install
ipython decorator`` (``pip install -e .[bench]`` installs the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from probe.data import IMAGENET_MEAN, IMAGENET_STD
from probe.synthesis import objectives as O
from probe.synthesis.param import ImageParam, fft_scale, maco_magnitude
from probe.synthesis.render import Normalize, forward_capture, frozen, render
from probe.synthesis.transform import Transforms

LAYER = "layer2"
LUCENT_COLOR = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])  # Lucid's ImageNet constant
LUCENT_COLOR = LUCENT_COLOR / LUCENT_COLOR.norm(dim=0).max()


def activation_reached(model, pixels: torch.Tensor, channels: list[int]) -> np.ndarray:
    """Spatial mean of ``channels[i]`` of ``LAYER`` on image ``i`` (pixels in [0, 1], no transforms)."""
    with torch.no_grad(), frozen(model):
        h = forward_capture(model, Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels), [LAYER])[LAYER]
    return h[torch.arange(len(channels)), channels].mean((1, 2)).numpy()


def pink_noise_magnitude(size: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    """MACO's magnitude template from ``n`` images of 1/f noise (a stand-in for natural images' spectrum)."""
    g = torch.Generator().manual_seed(seed)
    white = torch.fft.rfft2(torch.randn(n, 3, size, size, generator=g))
    noise = torch.fft.irfft2(white * fft_scale(size, size), s=(size, size))
    pixels = torch.sigmoid(noise / noise.std())
    return maco_magnitude(pixels, LUCENT_COLOR)


def probe_render(model, channels: list[int], steps: int, size: int, seed: int = 0, kind: str = "fourier",
                 magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """probe's render of ``channels`` in one batch; pixels ``(N, 3, size, size)``."""
    param = ImageParam(len(channels), 3, size, kind=kind, color=LUCENT_COLOR, seeds=[seed + c for c in channels],
                       magnitude=magnitude)
    if kind == "maco":
        transforms = Transforms(crop=(0.8, 1.0), noise=0.05)  # one crop per step: Lucent's number of forward passes
    else:  # Lucent's standard transforms at 64 px: pad 12 (grey), jitter, scale 0.9-1.1, rotate +-10, resize back
        transforms = Transforms(pad=12, pad_mode="constant", jitter=4, scale=(0.9, 1.1), rotate=10, final="resize",
                                out_size=size)
    res = render(model, O.channel(LAYER, channels), param, steps=steps, lr=0.3 if kind == "maco" else 0.05, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 transforms=transforms, seed=seed, redirect_relu_steps=16)
    return res.pixels


def lucent_render(model, channel: int, steps: int, size: int, layer: str = LAYER) -> torch.Tensor:
    """torch-lucent's ``render_vis`` of ``layer:channel`` (on CUDA when there is one); pixels ``(1, 3, size, size)``."""
    from lucent.optvis import param, render

    out = render.render_vis(model, f"{layer}:{channel}", param_f=lambda: param.image(size), show_image=False,
                            progress=False, fixed_image_size=size, thresholds=(steps,))
    return torch.from_numpy(out[-1]).permute(0, 3, 1, 2).float()


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t, time.process_time() - c)


def run(quick: bool = False, channels: int | None = None, lucent_channels: int | None = None, steps: int = 32,
        size: int = 64, kind: str = "fourier") -> dict:
    """Figures per channel for the three ways; ratios against the batched render, measured in this run."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    n = channels or (16 if quick else 128)
    n_lucent = min(n, lucent_channels or (4 if quick else 16))
    chans = list(range(n))
    result = {"model": "resnet18 (random weights)", "layer": LAYER, "param": kind, "channels": n,
              "lucent_channels": n_lucent, "steps": steps, "size": size, "threads": torch.get_num_threads(),
              "load_avg_1min": os.getloadavg()[0]}
    magnitude = pink_noise_magnitude(size) if kind == "maco" else None
    ours = lambda cs: probe_render(model, cs, steps, size, kind=kind, magnitude=magnitude)  # noqa: E731

    pixels, t = _timed(lambda: ours(chans))
    rows = {"batched": (t, n, activation_reached(model, pixels, chans))}
    pixels, t = _timed(lambda: torch.cat([ours([c]) for c in chans]))
    rows["one_at_a_time"] = (t, n, activation_reached(model, pixels, chans))
    try:
        import lucent  # noqa: F401
    except Exception as e:  # noqa: BLE001
        result["lucent_error"] = f"{type(e).__name__}: {e}"
    else:
        np.random.seed(0)
        torch.manual_seed(0)
        wall = cpu = 0.0
        imgs = []
        for c in chans[:n_lucent]:
            fresh = copy.deepcopy(model)  # render_vis leaves a hook on every module: a fresh copy per call
            img, (w, p) = _timed(lambda: lucent_render(fresh, c, steps, size))
            wall, cpu = wall + w, cpu + p
            imgs.append(img)
        rows["lucent_render_vis"] = ((wall, cpu), n_lucent, activation_reached(model, torch.cat(imgs), chans[:n_lucent]))

    (bw, bc), _, base = rows["batched"]
    for name, ((w, c), k, act) in rows.items():
        result[name] = {"channels": k, "wall_s_per_channel": w / k, "cpu_s_per_channel": c / k,
                        "batched_speedup_wall": (w / k) / (bw / n), "batched_speedup_cpu": (c / k) / (bc / n),
                        "activation_mean": float(act.mean()), "activation_median": float(np.median(act)),
                        "batched_activation_mean_same_channels": float(base[:k].mean()),
                        "frac_channels_batched_at_least": float((base[:k] >= act - 1e-6).mean())}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--channels", type=int, default=None)
    ap.add_argument("--lucent-channels", type=int, default=None)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--param", choices=("fourier", "maco"), default="fourier")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.quick, args.channels, args.lucent_channels, args.steps, args.size, args.param)
    if not args.quick:
        out = Path(__file__).parent / "results" / f"synthesis_{args.param}.json"
        out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"{r['model']} {r['layer']}, {r['param']}, {r['steps']} steps, {r['size']}x{r['size']}, {r['threads']} threads, "
          f"load average {r['load_avg_1min']:.1f}")
    print(f"{'method':<19}{'channels':>9}{'wall s/ch':>10}{'cpu s/ch':>9}{'batched faster':>22}"
          f"{'act. mean':>10}{'batched act.':>13}{'batched >=':>11}")
    for name in ("batched", "one_at_a_time", "lucent_render_vis"):
        if name in r:
            f = r[name]
            speed = f"{f['batched_speedup_wall']:.1f}x wall {f['batched_speedup_cpu']:.1f}x cpu"
            print(f"{name:<19}{f['channels']:>9}{f['wall_s_per_channel']:>10.3f}{f['cpu_s_per_channel']:>9.3f}{speed:>22}"
                  f"{f['activation_mean']:>10.3f}{f['batched_activation_mean_same_channels']:>13.3f}"
                  f"{f['frac_channels_batched_at_least']:>11.2f}")
    if "lucent_error" in r:
        print(f"lucent could not run: {r['lucent_error']}")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
