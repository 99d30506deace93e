"""``probe saliency run=<run dir>``: attribution maps of the fixed probe images and evidence of whether
they mean anything.

Writes ``<run>/saliency/``:

- ``maps.npz``: one (M, H, W) float32 array per method (reduced over input channels, see
  :mod:`probe.saliency.methods`), ``images`` (M, C, H, W) pixels in [0, 1], ``targets``, ``target_kind``
  (``true`` / ``predicted``), ``image`` (index among the probe images), ``labels``, ``predictions``.
  M is the number of probe images plus one more row per misclassified image (its predicted class).
- ``overlays/<method>.png``: every map over its image (one grid per method).
- ``metrics.parquet``: per method and map row: deletion / insertion AUC for the method's pixel order
  and for a seeded random order (same images, same substrate), and the substrate.
- ``randomisation.parquet``: cascading parameter randomisation, per method, map row and layer step:
  Spearman rank correlation of |maps| and SSIM with the original map.
- ``metrics.json``: per method, means over the true-class rows: deletion_auc, insertion_auc, their
  random-order baselines, and spearman / ssim after full randomisation (null when not run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from probe.analysis import open_run
from probe.errors import NumericalError
from probe.rundir import staged_dir, write_json, write_npz
from probe.saliency.batching import map_batches
from probe.saliency.config import SaliencyConfig, SaliencyStage
from probe.saliency.faithfulness import attribution_order, deletion_insertion_auc, random_order
from probe.saliency.methods import REDUCTION, MethodSettings, attribute, occlusion_geometry, reduce_channels
from probe.saliency.outputs import overlay_grid
from probe.saliency.prepare import attribution_copy, gradcam_layer
from probe.saliency.randomisation import cascade_order, cascading_randomisations, compare_maps
from probe.saliency.substrates import reference

log = logging.getLogger(__name__)


@dataclass
class Items:
    """The rows of every map: each probe image for its true class, again for its prediction where they differ."""

    x: torch.Tensor  # (M, C, H, W) normalised
    target: torch.Tensor  # (M,)
    kind: list[str]  # "true" | "predicted"
    image: torch.Tensor  # (M,) index among the probe images
    label: torch.Tensor  # (M,)
    prediction: torch.Tensor  # (M,)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return map_batches(lambda lo, hi: model(x[lo:hi]).argmax(1), len(x), batch_size, what="predict")


def probe_items(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Items:
    pred = predict(model, x, batch_size)
    y = y.to(pred.device)
    wrong = torch.nonzero(pred != y).flatten()
    idx = torch.cat([torch.arange(len(x), device=x.device), wrong.to(x.device)])
    target = torch.cat([y, pred[wrong]])
    kind = ["true"] * len(x) + ["predicted"] * len(wrong)
    return Items(x[idx], target, kind, idx.cpu(), y[idx.to(y.device)].cpu(), pred[idx.to(pred.device)].cpu())


def method_settings(sc: SaliencyConfig, model: nn.Module, x: torch.Tensor, mean, std, seed: int) -> MethodSettings:
    """Resolve fractions into absolute units: pixels for windows and blur, input units for SmoothGrad noise."""
    side = min(x.shape[-2:])
    sigma = sc.blur_sigma * side
    window, stride = occlusion_geometry(side, sc.occlusion_window, sc.occlusion_stride)
    value_range = float(x.max() - x.min())
    return MethodSettings(
        ig_steps=sc.ig_steps, ig_internal_batch_size=sc.ig_internal_batch_size,
        ig_baseline=partial(reference, sc.ig_baseline, mean=mean, std=std, blur_sigma=sigma),
        smoothgrad_samples=sc.smoothgrad_samples, smoothgrad_stdev=sc.smoothgrad_noise * value_range,
        smoothgrad_batch_size=sc.smoothgrad_batch_size,
        gradcam_layer=gradcam_layer(model, x, sc.gradcam_layer) if "grad_cam" in sc.methods else sc.gradcam_layer,
        occlusion_window=window, occlusion_stride=stride,
        occlusion_baseline=partial(reference, sc.occlusion_baseline, mean=mean, std=std, blur_sigma=sigma),
        occlusion_batch_size=sc.ig_internal_batch_size, seed=seed)


def compute_maps(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, s: MethodSettings,
                 batch_size: int) -> torch.Tensor:
    """Maps (M, H, W) float32 on the CPU, in chunks of ``batch_size`` images (halved on out-of-memory)."""
    def chunk(lo: int, hi: int) -> torch.Tensor:
        return reduce_channels(attribute(method, model, x[lo:hi], target[lo:hi], s), method).float().cpu()

    return map_batches(chunk, len(x), batch_size, what=f"saliency {method}")


def non_finite(maps: dict[str, torch.Tensor]) -> list[str]:
    """'method: rows [...]' for every method whose maps hold NaN or Inf."""
    bad = []
    for m, v in maps.items():
        rows = torch.nonzero(~torch.isfinite(v.flatten(1)).all(1)).flatten().tolist()
        if rows:
            bad.append(f"{m}: map rows {rows}")
    return bad


def faithfulness_table(model, items: Items, maps: dict[str, torch.Tensor], substrate: torch.Tensor,
                       sc: SaliencyConfig, seed: int) -> pd.DataFrame:
    """Deletion / insertion AUC per method and map row, with the random-order baseline (computed once)."""
    x, t = items.x, items.target
    pixels = x.shape[-2] * x.shape[-1]
    auc = partial(deletion_insertion_auc, model, x, t, substrate=substrate, steps=sc.auc_steps,
                  batch_size=sc.eval_batch_size)
    rand_del, rand_ins = auc(random_order(len(x), pixels, seed))
    frames = []
    for m, v in maps.items():
        d, i = auc(attribution_order(v.to(x.device)))
        frames.append(pd.DataFrame({
            "method": m, "item": np.arange(len(x)), "image": items.image.numpy(), "label": items.label.numpy(),
            "prediction": items.prediction.numpy(), "target": t.cpu().numpy(), "target_kind": items.kind,
            "substrate": sc.substrate, "auc_steps": sc.auc_steps,
            "deletion_auc": d.cpu().double().numpy(), "insertion_auc": i.cpu().double().numpy(),
            "deletion_auc_random": rand_del.cpu().double().numpy(),
            "insertion_auc_random": rand_ins.cpu().double().numpy()}))
    return pd.concat(frames, ignore_index=True)


def randomisation_table(amodel: nn.Module, items: Items, maps: dict[str, torch.Tensor], methods: list[str],
                        s: MethodSettings, batch_size: int, seed: int) -> pd.DataFrame:
    layers = cascade_order(amodel, items.x)
    rows = []
    for step, layer, rmodel in cascading_randomisations(amodel, layers, seed):
        for m in methods:
            rmap = compute_maps(m, rmodel, items.x, items.target, s, batch_size)
            bad = non_finite({m: rmap})
            if bad:
                raise NumericalError(f"saliency randomisation (layer {layer}): NaN/Inf in {bad[0]}")
            rho, sim = compare_maps(maps[m], rmap)
            rows.append(pd.DataFrame({
                "method": m, "item": np.arange(len(rmap)), "image": items.image.numpy(), "target_kind": items.kind,
                "layer": layer, "step": step, "layers_total": len(layers),
                "spearman": rho.numpy(), "ssim": sim.numpy()}))
    return pd.concat(rows, ignore_index=True)


def _mean(v: pd.Series):
    v = v.dropna()
    return None if v.empty else float(v.mean())


def summary(metrics: pd.DataFrame, randomisation: pd.DataFrame | None) -> dict:
    out = {}
    true = metrics[metrics.target_kind == "true"]
    for m, g in true.groupby("method", sort=True):
        out[m] = {k: _mean(g[k]) for k in ("deletion_auc", "insertion_auc", "deletion_auc_random",
                                            "insertion_auc_random")}
        out[m].update(spearman_randomised=None, ssim_randomised=None)
        if randomisation is not None:
            r = randomisation[(randomisation.method == m) & (randomisation.target_kind == "true")]
            if not r.empty:
                last = r[r.step == r.step.max()]
                out[m].update(spearman_randomised=_mean(last.spearman), ssim_randomised=_mean(last.ssim))
    return out


def run(cfg: SaliencyStage) -> Path:
    """Compute, check and write ``<run>/saliency/``; returns that folder."""
    sc = cfg.saliency
    ctx = open_run(cfg)
    model, device = ctx.run.model, ctx.device
    amodel = attribution_copy(model)
    items = probe_items(model, ctx.probe_x.to(device), ctx.probe_y, sc.batch_size)
    s = method_settings(sc, amodel, items.x, ctx.data.mean, ctx.data.std, cfg.seed)
    log.info("saliency: %d probe images, %d map rows; methods %s; grad_cam layer %s; occlusion %dpx/%dpx",
             len(ctx.probe_x), len(items.x), ", ".join(sc.methods), s.gradcam_layer, s.occlusion_window,
             s.occlusion_stride)

    maps: dict[str, torch.Tensor] = {}
    for m in sc.methods:
        t0 = time.perf_counter()
        maps[m] = compute_maps(m, amodel, items.x, items.target, s, sc.batch_size)
        log.info("saliency %s: %.2fs", m, time.perf_counter() - t0)
    bad = non_finite(maps)
    if bad:
        raise NumericalError(f"saliency: NaN/Inf in maps ({'; '.join(bad)}); nothing written")

    t0 = time.perf_counter()
    side = min(items.x.shape[-2:])
    substrate = reference(sc.substrate, items.x, ctx.data.mean, ctx.data.std, sc.blur_sigma * side)
    metrics = faithfulness_table(model, items, maps, substrate, sc, cfg.seed)
    log.info("saliency deletion/insertion: %.2fs", time.perf_counter() - t0)

    randomisation = None
    rand_methods = [m for m in sc.randomisation_methods if m in maps]
    if sc.randomisation and rand_methods:
        t0 = time.perf_counter()
        randomisation = randomisation_table(amodel, items, maps, rand_methods, s, sc.batch_size, cfg.seed)
        log.info("saliency randomisation: %.2fs", time.perf_counter() - t0)

    images = ctx.data.denormalize(items.x.cpu()).clamp(0, 1).numpy().astype(np.float32)
    with staged_dir(Path(cfg.run) / "saliency") as tmp:
        write_npz(tmp / "maps.npz", {**{m: v.numpy() for m, v in maps.items()}, "images": images,
                                     "targets": items.target.cpu().numpy(), "target_kind": np.array(items.kind),
                                     "image": items.image.numpy(), "labels": items.label.numpy(),
                                     "predictions": items.prediction.numpy()})
        metrics.to_parquet(tmp / "metrics.parquet", index=False)
        if randomisation is not None:
            randomisation.to_parquet(tmp / "randomisation.parquet", index=False)
        write_json(tmp / "metrics.json", summary(metrics, randomisation))
        if sc.overlays:
            titles = [f"#{int(i)} y={int(lab)} t={int(t)}{'*' if k == 'predicted' else ''}"
                      for i, lab, t, k in zip(items.image, items.label, items.target.cpu(), items.kind)]
            (tmp / "overlays").mkdir()
            for m, v in maps.items():
                overlay_grid(tmp / "overlays" / f"{m}.png", images, v.numpy(), titles, REDUCTION[m] == "signed", m)
    out = Path(cfg.run) / "saliency"
    log.info("saliency: wrote %s", out)
    return out
