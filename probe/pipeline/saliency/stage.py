"""``probe saliency run=<run dir>``: attribution maps of the fixed probe images and evidence of whether
they mean anything.

Writes ``<run>/saliency/``:

Every method attributes the *logit* of the target class (the input of a final (log-)softmax, which
is bypassed: :func:`probe.saliency.prepare.attribution_copy`); deletion / insertion score the softmax
probability of the target (:mod:`probe.saliency.faithfulness`).

- ``maps.npz``: one (M, H, W) float32 array per method (reduced over input channels, see
  :mod:`probe.saliency.methods`), ``images`` (M, C, H, W) pixels in [0, 1], ``targets``, ``target_kind``
  (``true`` / ``predicted``), ``image`` (index among the probe images), ``labels``, ``predictions``,
  ``probabilities`` (the softmax probability of the prediction), ``target_output`` (one string, ``["logit"]``: what the maps attribute).
  M is the number of probe images plus one more row per misclassified image (its predicted class).
- ``overlays/<method>.png``: every map over its image (one grid per method).
- ``metrics.parquet``: per method and map row: deletion / insertion AUC for the method's pixel order,
  and the mean and standard deviation (ddof 1) of the AUC over ``random_orders`` seeded random orders
  (same images, same substrate, the same orders for every method), and the substrate.
- ``randomisation.parquet``: cascading parameter randomisation, per method, map row and layer step:
  Spearman rank correlation of |maps| over all pixels and over the informative pixels (non-zero in
  either map; their count), and SSIM with the original map.
- ``road.parquet`` (``saliency.road``): ROAD per method and map row, :func:`probe.saliency.road.road_table`;
  its ``road_morf_auc`` / ``road_lerf_auc`` are also columns of ``metrics.parquet``.
- ``mprt.parquet`` (``saliency.mprt_variant``): Efficient MPRT per method and map row,
  :func:`probe.saliency.mprt.mprt_table`.
- ``metrics.json``: see :func:`summary` (per method: means over the true-class rows, each comparison
  with random orders with its interval, p and Holm-adjusted p, and the randomisation correlations
  with their t intervals over images), plus per method :func:`probe.saliency.road.road_summary` and
  :func:`probe.saliency.mprt.mprt_summary` keys.
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

from probe.pipeline.analysis import open_run
from probe.errors import NumericalError
from probe.pipeline.rundir import staged_dir, stamped
from probe.files import write_json, write_npz
from probe.saliency.batching import map_batches
from probe.pipeline.saliency.config import SaliencyConfig, SaliencyStage
from probe.saliency.faithfulness import attribution_order, deletion_insertion_auc, random_order_aucs, verdict
from probe.saliency.methods import REDUCTION, MethodSettings, compute_maps, occlusion_geometry
from probe.saliency.outputs import overlay_grid
from probe.saliency.prepare import TARGET_OUTPUT, attribution_copy, gradcam_layer, output_head
from probe.saliency.randomisation import cascade_order, cascading_randomisations, compare_maps
from probe.saliency.mprt import mprt_summary, mprt_table
from probe.saliency.road import road_summary, road_table
from probe.saliency.substrates import reference
from probe.uncertainty import ALPHA, adjust, mean_interval, paired_comparison

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
    probability: torch.Tensor | None = None  # (M,) softmax probability of the prediction


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted class of each image and its softmax probability (the same for logits and log-probabilities)."""
    p = map_batches(lambda lo, hi: model(x[lo:hi]).float().softmax(1), len(x), batch_size, what="predict")
    prob, pred = p.max(1)
    return pred, prob


def probe_items(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Items:
    pred, prob = predict(model, x, batch_size)
    y = y.to(pred.device)
    wrong = torch.nonzero(pred != y).flatten()
    idx = torch.cat([torch.arange(len(x), device=x.device), wrong.to(x.device)])
    target = torch.cat([y, pred[wrong]])
    kind = ["true"] * len(x) + ["predicted"] * len(wrong)
    return Items(x[idx], target, kind, idx.cpu(), y[idx.to(y.device)].cpu(), pred[idx.to(pred.device)].cpu(),
                 prob[idx.to(prob.device)].cpu())


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
        gradcam_layer=(gradcam_layer(model, x, sc.gradcam_layer, key="saliency.gradcam_layer")
                       if "grad_cam" in sc.methods else sc.gradcam_layer),
        occlusion_window=window, occlusion_stride=stride,
        occlusion_baseline=partial(reference, sc.occlusion_baseline, mean=mean, std=std, blur_sigma=sigma),
        occlusion_batch_size=sc.ig_internal_batch_size, seed=seed)


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
    """Deletion / insertion AUC per method and map row, with the mean and standard deviation (ddof 1) of the AUC
    over ``sc.random_orders`` seeded random pixel orders per row (computed once: the same orders for every
    method). ``model`` returns logits; the curves score the softmax probability of the target."""
    x, t = items.x, items.target
    auc = partial(deletion_insertion_auc, model, x, t, substrate=substrate, steps=sc.auc_steps,
                  batch_size=sc.eval_batch_size)
    t0 = time.perf_counter()
    rand_del, rand_ins = random_order_aucs(model, x, t, substrate, sc.auc_steps, sc.random_orders, seed,
                                           sc.eval_batch_size)
    log.info("saliency random orders (%d per row, %d rows): %.2fs", sc.random_orders, len(x), time.perf_counter() - t0)
    rd, ri = rand_del.cpu().double(), rand_ins.cpu().double()
    frames = []
    for m, v in maps.items():
        d, i = auc(attribution_order(v.to(x.device)))
        frames.append(pd.DataFrame({
            "method": m, "item": np.arange(len(x)), "image": items.image.numpy(), "label": items.label.numpy(),
            "prediction": items.prediction.numpy(), "target": t.cpu().numpy(), "target_kind": items.kind,
            "substrate": sc.substrate, "auc_steps": sc.auc_steps, "random_orders": sc.random_orders,
            "deletion_auc": d.cpu().double().numpy(), "insertion_auc": i.cpu().double().numpy(),
            "deletion_auc_random": rd.mean(0).numpy(), "deletion_auc_random_std": rd.std(0).numpy(),
            "insertion_auc_random": ri.mean(0).numpy(), "insertion_auc_random_std": ri.std(0).numpy()}))
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
            sim = compare_maps(maps[m], rmap)
            rows.append(pd.DataFrame({
                "method": m, "item": np.arange(len(rmap)), "image": items.image.numpy(), "target_kind": items.kind,
                "layer": layer, "step": step, "layers_total": len(layers),
                "spearman": sim["spearman"].double().numpy(),
                "spearman_informative": sim["spearman_informative"].double().numpy(),
                "informative_pixels": sim["informative_pixels"].numpy().astype(np.int64),
                "ssim": sim["ssim"].double().numpy()}))
    return pd.concat(rows, ignore_index=True)


def _mean(v: pd.Series):
    v = v.dropna()
    return None if v.empty else float(v.mean())


def _estimate(v: pd.Series):
    """mean_interval over the finite values (NaN rows: a constant map), as a dict; None when there are none."""
    v = v.dropna()
    return None if v.empty else mean_interval(v.to_numpy()).to_dict()


METRICS = ("deletion", "insertion")  # deletion: lower than random is better; insertion: higher is better


def summary(metrics: pd.DataFrame, randomisation: pd.DataFrame | None, gradcam_layer: str | None = None,
            head: str | None = None) -> dict:
    """The stage's metrics.json. Over the true-class rows (one per probe image):

    - run level: ``target`` ("logit": what every map attributes), ``head_bypassed`` (the model's final
      "log_softmax" / "softmax" bypassed for attribution, or null), ``gradcam_layer`` (null without grad_cam),
      ``random_orders`` and ``auc_steps``;
    - per method: ``deletion_auc``, ``insertion_auc`` (means), ``deletion_auc_random``, ``insertion_auc_random``
      (means of each image's mean over the random orders), ``deletion_vs_random`` / ``insertion_vs_random``
      (:meth:`probe.uncertainty.Comparison.to_dict`: effect = method - random, paired over images, 95% t
      interval, sign-flip p, ``p_adjusted`` by Holm over every method x {deletion, insertion} of the run,
      ``distinguishable`` at alpha 0.05 on the adjusted p), ``deletion_verdict`` / ``insertion_verdict``
      ("better than random" / "worse than random" / "not distinguishable from random"), and after full
      randomisation (null when not run): ``spearman_randomised`` (all pixels), ``spearman_randomised_informative``
      (pixels non-zero in either map), ``ssim_randomised`` (each :meth:`probe.uncertainty.Estimate.to_dict`, t
      interval over images) and ``spearman_informative_vs_all`` (paired comparison, informative - all).
    """
    true = metrics[metrics.target_kind == "true"]
    groups = dict(list(true.groupby("method", sort=True)))
    family = [(m, k) for m in groups for k in METRICS]
    comparisons = adjust([paired_comparison(groups[m][f"{k}_auc"].to_numpy(), groups[m][f"{k}_auc_random"].to_numpy())
                          for m, k in family])
    out: dict = {"target": TARGET_OUTPUT, "head_bypassed": head, "gradcam_layer": gradcam_layer,
                 "random_orders": int(metrics.random_orders.iloc[0]), "auc_steps": int(metrics.auc_steps.iloc[0])}
    for m, g in groups.items():
        out[m] = {k: _mean(g[k]) for k in ("deletion_auc", "insertion_auc", "deletion_auc_random",
                                            "insertion_auc_random")}
        out[m].update(spearman_randomised=None, spearman_randomised_informative=None, ssim_randomised=None,
                      spearman_informative_vs_all=None)
    for (m, k), c in zip(family, comparisons):
        out[m][f"{k}_vs_random"] = c.to_dict()
        out[m][f"{k}_verdict"] = verdict(c, k, ALPHA)
    if randomisation is not None:
        for m in groups:
            r = randomisation[(randomisation.method == m) & (randomisation.target_kind == "true")]
            if r.empty:
                continue
            last = r[r.step == r.step.max()]
            out[m].update(spearman_randomised=_estimate(last.spearman),
                          spearman_randomised_informative=_estimate(last.spearman_informative),
                          ssim_randomised=_estimate(last.ssim))
            both = last[["spearman_informative", "spearman"]].dropna()
            if len(both):
                out[m]["spearman_informative_vs_all"] = paired_comparison(
                    both.spearman_informative.to_numpy(), both.spearman.to_numpy()).to_dict()
    return out


def run(cfg: SaliencyStage) -> Path:
    """Compute, check and write ``<run>/saliency/``; returns that folder."""
    sc = cfg.saliency
    ctx = open_run(cfg)
    model, device = ctx.run.model, ctx.device
    items = probe_items(model, ctx.probe_x.to(device), ctx.probe_y, sc.batch_size)
    amodel = attribution_copy(model, items.x[:1])  # attributes the logit: a final (log-)softmax is bypassed
    head = output_head(model, items.x[:1])
    s = method_settings(sc, amodel, items.x, ctx.data.mean, ctx.data.std, cfg.seed)
    log.info("saliency: %d probe images, %d map rows; methods %s; target: the %s%s; grad_cam layer %s; "
             "occlusion %dpx/%dpx", len(ctx.probe_x), len(items.x), ", ".join(sc.methods), TARGET_OUTPUT,
             f" ({head} bypassed)" if head else "", s.gradcam_layer, s.occlusion_window, s.occlusion_stride)

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
    metrics = faithfulness_table(amodel, items, maps, substrate, sc, cfg.seed)
    log.info("saliency deletion/insertion: %.2fs", time.perf_counter() - t0)

    randomisation = None
    rand_methods = [m for m in sc.randomisation_methods if m in maps]
    if sc.randomisation and rand_methods:
        t0 = time.perf_counter()
        randomisation = randomisation_table(amodel, items, maps, rand_methods, s, sc.batch_size, cfg.seed)
        log.info("saliency randomisation: %.2fs", time.perf_counter() - t0)

    road = emprt = None  # ROAD (Rong et al. 2022) and Efficient MPRT (Hedström et al. 2023), beside the above
    if sc.road:
        t0 = time.perf_counter()
        road = road_table(amodel, items.x, items.target, maps, items.image.numpy(), items.kind, sc.road_fractions,
                          [sc.road_noise / sd for sd in ctx.data.std], cfg.seed, sc.eval_batch_size)  # noise: pixel units
        metrics = metrics.merge(road[["method", "item", "road_morf_auc", "road_lerf_auc"]], on=["method", "item"],
                                how="left")
        log.info("saliency ROAD: %.2fs", time.perf_counter() - t0)
    if sc.mprt_variant:
        t0 = time.perf_counter()
        emprt = mprt_table(amodel, items.x, maps, lambda m, rm: compute_maps(m, rm, items.x, items.target, s, sc.batch_size),
                           items.image.numpy(), items.kind, cfg.seed)
        log.info("saliency eMPRT: %.2fs", time.perf_counter() - t0)
    per_method = [road_summary(road) if road is not None else {}, mprt_summary(emprt) if emprt is not None else {}]

    images = ctx.data.denormalize(items.x.cpu()).clamp(0, 1).numpy().astype(np.float32)
    with staged_dir(Path(cfg.run) / "saliency") as tmp:
        write_npz(tmp / "maps.npz", {**{m: v.numpy() for m, v in maps.items()}, "images": images,
                                     "targets": items.target.cpu().numpy(), "target_kind": np.array(items.kind),
                                     "image": items.image.numpy(), "labels": items.label.numpy(),
                                     "predictions": items.prediction.numpy(), "probabilities": items.probability.numpy(),
                                     "target_output": np.array(TARGET_OUTPUT)})
        metrics.to_parquet(tmp / "metrics.parquet", index=False)
        if randomisation is not None:
            randomisation.to_parquet(tmp / "randomisation.parquet", index=False)
        if road is not None:
            road.to_parquet(tmp / "road.parquet", index=False)
        if emprt is not None:
            emprt.to_parquet(tmp / "mprt.parquet", index=False)
        summ = summary(metrics, randomisation, s.gradcam_layer if "grad_cam" in sc.methods else None, head)
        for extra in per_method:  # ROAD and eMPRT keys beside each method's deletion / insertion keys
            for m, keys in extra.items():
                summ[m].update(keys)
        write_json(tmp / "metrics.json", stamped(ctx.run.path, summ))
        if sc.overlays:
            titles = [f"#{int(i)} y={int(lab)} t={int(t)}{'*' if k == 'predicted' else ''}"
                      for i, lab, t, k in zip(items.image, items.label, items.target.cpu(), items.kind)]
            (tmp / "overlays").mkdir()
            for m, v in maps.items():
                overlay_grid(tmp / "overlays" / f"{m}.png", images, v.numpy(), titles, REDUCTION[m] == "signed", m)
    out = Path(cfg.run) / "saliency"
    log.info("saliency: wrote %s", out)
    return out
