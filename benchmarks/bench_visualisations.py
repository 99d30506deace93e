"""Which parametrisation makes synthetic images that mean something: the table behind synthesis's defaults.

On the default pipeline's trained runs (``dvc repro`` first: ``artifacts/<run>/``), for each parametrisation:

- class images (one per class, per run): how often the *other* trained runs recognise them as their class
  (transfer, over every ordered pair of distinct runs, Wilson's interval), the lowest probability a class
  image gets from its own model, and the share saturated;
- channel images (every channel of each run's default layers): the share out-activating the best dataset
  image at the spatial mean (the activations stage's exemplars), and the most saturated layer's share.

Saturated: more values within 2% of 0 or 1 than in 99% of the training images (``probe.synthesis.judge``).
Everything else is the synthesize stage's default config (steps, lr, transforms), changed only as the row says
(MACO: its crops and noise, 4 per step, and lr 0.3).

    python benchmarks/bench_visualisations.py [--runs lenet5,lenet5_seed1,vgg_small,resnet_small]

writes ``benchmarks/results/visualisations.json`` and prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from probe.hooks import spaced_convs
from probe.pipeline.analysis import run_data
from probe.pipeline.rundir import load_run
from probe.pipeline.synthesis.config import Regularisers, SynthesisConfig
from probe.pipeline.synthesis.stage import activations_best, image_param, penalties, training_prior
from probe.synthesis import judge as J
from probe.synthesis import objectives as O
from probe.synthesis.render import render
from probe.synthesis.transform import Transforms
from probe.uncertainty import proportion_interval

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = SynthesisConfig()
MACO_T = {"crop": (0.8, 1.0), "noise": 0.05, "copies": 4}  # MACO's random crops and noise, 4 per step
MACO_LR = 0.3  # phases need larger steps than Fourier coefficients (0.05 reaches 0.81 of lenet5's conv2 channels, 0.3 all)
# name -> (parametrisation, regularisers of class images, regularisers of channel images, MACO transforms)
VARIANTS = {
    "fourier (Lucid)": ("fourier", Regularisers(tv=0.05), DEFAULT.reg, False),
    "maco (phase only)": ("maco", Regularisers(), DEFAULT.reg, True),
    "pca + Gaussian prior": ("pca", DEFAULT.class_images.reg, DEFAULT.class_images.reg, False),
}


def transforms(size: int, maco: bool) -> Transforms:
    t = DEFAULT.transforms
    extra = MACO_T if maco else {}
    return Transforms.from_fractions(size, t.pad, t.pad_mode, t.jitter, t.scale, t.rotate, **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="lenet5,lenet5_seed1,vgg_small,resnet_small")
    args = ap.parse_args()
    torch.manual_seed(0)
    names = args.runs.split(",")
    runs = {n: load_run(ROOT / "artifacts" / n) for n in names}
    data = run_data(runs[names[0]].card)
    size = data.image_size
    # the stage's prior, with MACO's magnitude and value map and the principal components all fixed
    prior = training_prior(data, replace(DEFAULT, param=replace(DEFAULT.param, kind="maco")), size)
    limit = prior.saturation_limit

    def param(kind: str, seeds: list[int]):
        return image_param(replace(DEFAULT.class_images.param, kind=kind), len(seeds), data.channels, size, prior, seeds, "cpu")
    judges = {n: (r.model.eval(), data.mean, data.std) for n, r in runs.items()}
    classes = list(range(data.num_classes))
    c = DEFAULT.class_images
    out = {"runs": names, "saturation_limit": limit, "variants": {}}
    for name, (kind, class_reg, channel_reg, maco) in VARIANTS.items():
        t0 = time.perf_counter()
        tr = transforms(size, maco)
        images, own = {}, []
        for n, r in runs.items():
            obj = O.class_logit(classes)
            pen = penalties(class_reg, prior)
            res = render(r.model, obj - pen if pen is not None else obj, param(kind, classes),
                         steps=c.steps, lr=MACO_LR if maco else c.lr, mean=data.mean, std=data.std, transforms=tr, seed=0,
                         redirect_relu_steps=DEFAULT.redirect_relu_steps)
            images[n] = res.pixels
            own.append(float(torch.softmax(res.acts[O.LOGITS].double(), 1)[torch.arange(len(classes)), classes].min()))
        hits = [J.transfer({b: judges[b]}, images[a], classes)["recognised"].to_numpy()
                for a, b in itertools.permutations(names, 2)]
        k = int(np.concatenate(hits).sum())
        total = sum(len(h) for h in hits)
        class_sat = np.concatenate([J.saturation(images[n]) for n in names]) > limit
        out_k = out_n = 0
        worst = 0.0
        for n, r in runs.items():
            best = activations_best(r.path)
            for layer in spaced_convs(r.model):
                chans = [ch for (lay, ch) in best if lay == layer]
                obj = O.channel(layer, chans, DEFAULT.objective)
                pen = penalties(channel_reg, prior)
                res = render(r.model, obj - pen if pen is not None else obj, param(kind, chans),
                             steps=DEFAULT.steps, lr=MACO_LR if maco else DEFAULT.lr, mean=data.mean, std=data.std, transforms=tr, seed=0,
                             redirect_relu_steps=DEFAULT.redirect_relu_steps)
                act = res.acts[layer].flatten(2).mean(2)[torch.arange(len(chans)), chans]
                ref = torch.tensor([best[(layer, ch)][0] for ch in chans])
                out_k += int((act > ref).sum())
                out_n += len(chans)
                worst = max(worst, float((J.saturation(res.pixels) > limit).mean()))
        out["variants"][name] = {
            "transfer": proportion_interval(k, total).to_dict() | {"k": k},
            "own_probability_min": min(own),
            "class_saturated": float(class_sat.mean()),
            "channel_out_activates_mean": proportion_interval(out_k, out_n).to_dict() | {"k": out_k},
            "channel_saturated_worst_layer": worst,
            "seconds": time.perf_counter() - t0}
        v = out["variants"][name]
        print(f"{name:<24} transfer {k}/{total} = {k / total:.2f}  own p min {min(own):.3f}  class saturated "
              f"{v['class_saturated']:.2f}  channels out-activate {out_k}/{out_n}  worst layer saturated {worst:.2f}",
              flush=True)
    (ROOT / "benchmarks" / "results" / "visualisations.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
