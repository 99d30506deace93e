"""``probe synthesize``: channel images, class images and Deep Dream for one run dir -> ``<run>/synthesis/``.

Outputs: ``images.npz`` (arrays ``channel``, ``class``, ``dream``, ``dream_source``, ``zoom``: pixels in
[0, 1], ``(N, C, H, W)``; ``color_sqrt``), ``metrics.parquet`` (one row per image; ``kind`` + ``image``
index into the array of that kind; columns :data:`COLUMNS`, defined in :func:`metrics_table`),
``metrics.json`` (DVC metrics, :func:`summary_metrics`) and PNG grids.

A channel image is compared with the best dataset image twice: by the channel's spatial mean (what it
was optimised for; the best image is the activations stage's rank-0 exemplar) and at the channel's peak
(its maximum over positions, against the largest value the channel takes anywhere in the dataset), as
margins (differences), and as ratios only where the dataset value is > 0. Class images maximise the
logit before any softmax (Simonyan et al. 2014, section 2); the number reported is the probability
the model assigns to the class.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from probe.pipeline.analysis import Context, open_run
from probe.hooks import check_layers, middle_conv, spaced_convs
from probe.pipeline.rundir import stale, staged_dir, stamped
from probe.files import write_json, write_npz
from probe.synthesis import objectives as O
from probe.pipeline.synthesis.config import ParamConfig, Regularisers, SynthesisConfig, SynthesizeStage, select_indices
from probe.synthesis.dream import deep_dream_octaves, zoom_frames
from probe.synthesis.outputs import grid_png
from probe.synthesis import judge as J
from probe.synthesis.accentuate import accentuate
from probe.synthesis.param import (ImageParam, PixelBasis, color_sqrt, maco_magnitude, pca_basis, training_images,
                                   value_map)
from probe.synthesis.render import forward_capture, frozen, render
from probe.synthesis.transform import Transforms
from probe.uncertainty import paired_comparison, proportion_interval

log = logging.getLogger(__name__)

EXEMPLARS = Path("activations") / "exemplars.parquet"
STATS = Path("activations") / "stats.parquet"


def stable_seed(*parts) -> int:
    """A seed from names and numbers that does not depend on Python's hash randomisation."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def layer_widths(model: nn.Module, layers: list[str], channels: int, size: int, device) -> dict[str, int]:
    """Number of channels (or units) in each layer's output for a ``channels x size x size`` input."""
    with torch.no_grad(), frozen(model):
        acts = forward_capture(model, torch.zeros(1, channels, size, size, device=device), layers)
    return {k: int(v.shape[1]) for k, v in acts.items()}


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` -> ``(N, C)``: each channel's mean over its positions."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


def spatial_max(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` -> ``(N, C)``: each channel's maximum over its positions (its peak)."""
    return t.flatten(2).amax(2) if t.dim() > 2 else t


def dataset_best(model: nn.Module, loader: DataLoader, layers: list[str], device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``(mean, peak)``, each ``(C,)``: over every image of ``loader``, the largest channel
    spatial mean (the best image by mean) and the largest value at any position (the best image at its peak)."""
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), frozen(model):
        for x, _ in loader:
            acts = forward_capture(model, x.to(device), layers)
            for name, t in acts.items():
                m, p = spatial_mean(t).amax(0).cpu(), spatial_max(t).amax(0).cpu()
                best[name] = (m, p) if name not in best else (torch.maximum(best[name][0], m), torch.maximum(best[name][1], p))
    return best


def activations_best(run_dir: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """``(layer, channel) -> (mean, peak)`` from the activations stage when it ran: the rank-0 exemplar's
    spatial mean (exemplars are ranked by it) and the channel's maximum over every position of every image
    (``stats.parquet``'s exact ``max``)."""
    ex, st = run_dir / EXEMPLARS, run_dir / STATS
    if not (ex.is_file() and st.is_file()):
        return {}
    reason = stale(run_dir, "activations")
    if reason:  # exemplars of other weights are no yardstick for these
        log.warning("synthesis: %s; computing the best dataset activations here instead", reason)
        return {}
    df = pd.read_parquet(ex, columns=["layer", "channel", "rank", "value"])
    top = {(str(r.layer), int(r.channel)): float(r.value) for r in df[df["rank"] == 0].itertuples()}
    peak = pd.read_parquet(st, columns=["layer", "channel", "max"])
    return {k: (top[k], float(r.max)) for r in peak.itertuples() if (k := (str(r.layer), int(r.channel))) in top}


@dataclass
class Prior:
    """What the run's own training images (``color_samples`` of them) fix for synthesis: the colour decorrelation,
    MACO's magnitude spectrum and value map (``gain``, ``offset``), the principal components (``basis``), each None
    where no parametrisation or regulariser asks for it, and the saturation above which an image counts as saturated."""

    color: torch.Tensor
    saturation_limit: float
    magnitude: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    basis: PixelBasis | None = None


def training_prior(data, s: SynthesisConfig, size: int) -> Prior:
    """The :class:`Prior` of ``data`` (a :class:`probe.data.Dataset`-like object: ``train``, ``mean``, ``std``,
    ``channels``) for the parametrisations and regularisers ``s`` asks for, at ``size`` pixels."""
    c = data.channels
    pixels = training_images(data.train, data.mean, data.std, (size, size), s.color_samples)
    color = color_sqrt(pixels) if s.param.decorrelate else torch.eye(c)
    prior = Prior(color, J.saturation_limit(J.saturation(pixels)))
    params = [s.param] + ([s.class_images.param] if s.class_images.enabled else [])
    if any(p.kind == "maco" for p in params):
        prior.magnitude = maco_magnitude(pixels, color)
        energy = prior.magnitude.pow(2).flatten(1).sum(1) / (size * size)  # mean square of each decorrelated channel
        prior.gain, prior.offset = value_map(pixels, (color.pow(2) @ energy).sqrt())
    pca = [p.variance for p in params if p.kind == "pca"]
    if pca or s.reg.prior or s.class_images.reg.prior:
        prior.basis = pca_basis(pixels, variance=max(pca, default=0.99))
    return prior


def render_channels(ctx: Context, s: SynthesisConfig, layers: list[str], widths: dict[str, int], size: int,
                    prior: Prior, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """All chosen channels of every layer, ``s.batch_size`` images per optimisation batch; with
    ``diversity.k > 1``, k images per channel (``facet`` 0 to k-1) with Lucid's diversity term between them."""
    model, channels = ctx.run.model, ctx.data.channels
    transforms = _transforms(s, size)
    k = s.diversity.k
    rows, images, maps, count = [], [], [], 0
    for layer in layers:
        chosen = select_indices("synthesis.channels", s.channels, widths[layer])
        log.info("synthesis: %s, %d channels x %d images, %d steps", layer, len(chosen), k, s.steps)
        per_batch = max(1, s.batch_size // k)
        for start in range(0, len(chosen), per_batch):
            chunk = chosen[start:start + per_batch]
            units = [c for c in chunk for _ in range(k)]
            facets = [j for _ in chunk for j in range(k)]
            seeds = [stable_seed(seed, layer, c) if j == 0 else stable_seed(seed, layer, c, j) for c, j in zip(units, facets)]
            param = image_param(s.param, len(units), channels, size, prior, seeds, ctx.device)
            objective = O.channel(layer, units, s.objective)
            if k > 1 and s.diversity.weight:
                objective = objective - s.diversity.weight * O.diversity(s.diversity.layer or layer, k)
            reg = penalties(s.reg, prior)
            if reg is not None:
                objective = objective - reg
            res = render(model, objective, param, steps=s.steps, lr=s.lr, mean=ctx.data.mean, std=ctx.data.std,
                         transforms=transforms, seed=stable_seed(seed, layer, "chunk", start),
                         redirect_relu_steps=s.redirect_relu_steps, on_nan=s.on_nan,
                         labels=[f"layer {layer} channel {c}" + (f" image {j}" if k > 1 else "") for c, j in zip(units, facets)])
            act, peak = spatial_mean(res.acts[layer]), spatial_max(res.acts[layer])
            for i, (c, j) in enumerate(zip(units, facets)):
                rows.append({"kind": "channel", "layer": layer, "channel": c, "facet": j, "image": count + i,
                             "objective_name": objective.name, "objective": float(res.objective[i]),
                             "activation": float(act[i, c]), "activation_peak": float(peak[i, c]),
                             "failed_step": int(res.failed_step[i])})
            images.append(res.pixels.numpy())
            maps.append(res.transparency.numpy())
            count += len(units)
    empty = np.zeros((0, channels, size, size), np.float32)
    return rows, {"channel": np.concatenate(images) if images else empty,
                  "channel_transparency": np.concatenate(maps) if maps else empty}


def render_classes(ctx: Context, s: SynthesisConfig, size: int, prior: Prior, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """One image per chosen class, maximising its logit (Simonyan et al. 2014, section 2: the unnormalised class
    score; or, with ``objective=log_prob``, its log-probability), with the probability the model assigns it."""
    c = s.class_images
    classes = select_indices("synthesis.class_images.classes", c.classes, ctx.data.num_classes)
    param = image_param(c.param, len(classes), ctx.data.channels, size, prior, [stable_seed(seed, "class", k) for k in classes],
                   ctx.device)
    objective = O.class_logit(classes) if c.objective == "logit" else O.class_log_prob(classes)
    reg = penalties(c.reg, prior)
    if reg is not None:
        objective = objective - reg
    log.info("synthesis: %d class images, %d steps", len(classes), c.steps)
    res = render(ctx.run.model, objective, param, steps=c.steps, lr=c.lr, mean=ctx.data.mean, std=ctx.data.std,
                 transforms=_transforms(s, size), seed=stable_seed(seed, "class"), redirect_relu_steps=s.redirect_relu_steps,
                 on_nan=s.on_nan, labels=[f"class {k} ({ctx.data.classes[k]})" for k in classes])
    logits = res.acts[O.LOGITS]  # the scores before a final (log-)softmax (probe.models.head.scores_model)
    prob = torch.softmax(logits.double(), dim=1)
    rows = [{"kind": "class", "layer": O.LOGITS, "class": k, "image": i, "objective_name": objective.name,
             "objective": float(res.objective[i]),
             "activation": float(logits[i, k]), "probability": float(prob[i, k]),
             "predicted": int(prob[i].argmax()), "failed_step": int(res.failed_step[i])} for i, k in enumerate(classes)]
    return rows, {"class": res.pixels.numpy(), "class_transparency": res.transparency.numpy()}


def accentuate_exemplars(ctx: Context, s: SynthesisConfig, ch_rows: list[dict], prior: Prior, seed: int,
                         split: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Feature accentuation of every rendered channel's top dataset exemplar (the activations stage's rank-0 image,
    an index into the whole ``split``: the activations stage is taken to have analysed the split this stage reads,
    as the default pipeline does, whatever either stage's ``data.limit``), in one batch per layer; rows of kind
    ``accentuated`` with the exemplar's own activation as ``dataset_activation``. Channels whose exemplar lies
    outside the split are left out, with a warning."""
    a = s.accentuate
    images_of = ctx.data.split(split)
    table = ctx.run.path / EXEMPLARS
    if not table.is_file() or stale(ctx.run.path, "activations"):
        log.warning("synthesis: no current activations stage exemplars in %s; skipping feature accentuation", ctx.run.path)
        return [], {}
    top = pd.read_parquet(table, columns=["layer", "channel", "rank", "index"])
    top = {(str(r.layer), int(r.channel)): int(r.index) for r in top[top["rank"] == 0].itertuples()}
    rows, images, seeds_out, count = [], [], [], 0
    for layer in dict.fromkeys(r["layer"] for r in ch_rows):
        units = [r["channel"] for r in ch_rows if r["layer"] == layer and r.get("facet", 0) == 0 and (layer, r["channel"]) in top]
        outside = [c for c in units if top[(layer, c)] >= len(images_of)]
        if outside:
            log.warning("synthesis: the top exemplars of %s channels %s lie outside the %s split (%d images); not "
                        "accentuated", layer, outside, split, len(images_of))
        units = [c for c in units if c not in outside]
        if not units:
            continue
        idx = [top[(layer, c)] for c in units]
        seeds = ctx.data.denormalize(torch.stack([images_of[i][0] for i in idx])).clamp(0, 1)
        if tuple(seeds.shape[2:]) != tuple(ctx.probe_x.shape[2:]) or seeds.shape[1] != ctx.data.channels:
            continue
        log.info("synthesis: accentuating the top exemplar of %d channels of %s, %d steps", len(units), layer, a.steps)
        res = accentuate(ctx.run.model, O.channel(layer, units, s.objective), seeds, weight=a.weight, steps=a.steps,
                         lr=a.lr, mean=ctx.data.mean, std=ctx.data.std, color=prior.color,
                         transforms=_transforms(s, seeds.shape[-1]), seed=stable_seed(seed, "accentuate", layer),
                         labels=[f"layer {layer} channel {c} (accentuated)" for c in units], on_nan=s.on_nan)
        before = spatial_mean(_layer(ctx, layer, seeds))
        act = spatial_mean(res.acts[layer])
        for i, (c, d) in enumerate(zip(units, idx)):
            rows.append({"kind": "accentuated", "layer": layer, "channel": c, "image": count + i, "source_index": d,
                         "objective_name": f"channel[{layer}] - {a.weight} * distance_to_seed",
                         "objective": float(res.objective[i]), "activation": float(act[i, c]),
                         "dataset_activation": float(before[i, c]), "dataset_source": "exemplar",
                         "distance": float((res.pixels[i] - seeds[i]).pow(2).mean()),
                         "failed_step": int(res.failed_step[i])})
        images.append(res.pixels.numpy())
        seeds_out.append(seeds.numpy())
        count += len(units)
    if not images:
        return [], {}
    return rows, {"accentuated": np.concatenate(images), "accentuated_source": np.concatenate(seeds_out)}


def _layer(ctx: Context, layer: str, pixels: torch.Tensor) -> torch.Tensor:
    """``layer``'s output for ``pixels`` in [0, 1] (normalised as the model takes them), no gradients, on the CPU."""
    from probe.synthesis.render import Normalize

    with torch.no_grad(), frozen(ctx.run.model):
        return forward_capture(ctx.run.model, Normalize(ctx.data.mean, ctx.data.std)(pixels.to(ctx.device)), [layer])[layer].cpu()


def render_dreams(ctx: Context, s: SynthesisConfig, layer: str, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Deep Dream of the chosen probe images, and zoom-and-repeat frames from the first one."""
    d = s.dream
    idx = [i for i in d.images if i < len(ctx.probe_x)]
    src = ctx.data.denormalize(ctx.probe_x[idx]).clamp(0, 1).to(ctx.device)
    model = ctx.run.model
    kw = dict(mean=ctx.data.mean, std=ctx.data.std, lr=d.lr, jitter=d.jitter)
    log.info("synthesis: deep dream on %s, %d images, %d octaves", layer, len(idx), d.octaves)
    dreams = deep_dream_octaves(model, src, layer, octaves=d.octaves, octave_scale=d.octave_scale, steps=d.steps,
                                seed=stable_seed(seed, "dream"), **kw)
    frames = (zoom_frames(model, dreams[:1], layer, frames=d.zoom_frames, zoom=d.zoom, steps=d.zoom_steps,
                          seed=stable_seed(seed, "zoom"), **kw)[:, 0] if d.zoom_frames else dreams[:0])
    norm = lambda x: O.deep_dream(layer)({layer: _layer(ctx, layer, x)}, x)  # noqa: E731
    before, after, zoomed = norm(src), norm(dreams), norm(frames) if len(frames) else torch.zeros(0)
    rows = [{"kind": "dream", "layer": layer, "class": int(ctx.probe_y[p]), "image": i, "objective": float(after[i]),
             "activation": float(after[i]), "dataset_activation": float(before[i]), "dataset_source": "probe_image",
             "failed_step": -1} for i, p in enumerate(idx)]
    rows += [{"kind": "zoom", "layer": layer, "class": int(ctx.probe_y[idx[0]]), "image": f, "objective": float(zoomed[f]),
              "activation": float(zoomed[f]), "dataset_activation": float(before[0]), "dataset_source": "probe_image",
              "failed_step": -1} for f in range(len(frames))]
    arrays = {"dream": dreams.cpu().numpy(), "dream_source": src.cpu().numpy(), "zoom": frames.cpu().numpy()}
    return rows, arrays


def image_param(p: ParamConfig, n: int, channels: int, size: int, prior: Prior, seeds: list[int], device) -> ImageParam:
    maco = p.kind == "maco"
    return ImageParam(n, channels, size, kind=p.kind, color=prior.color, decay_power=p.decay_power, init_sd=p.init_sd,
                      seeds=seeds, magnitude=prior.magnitude if maco else None, basis=prior.basis,
                      gain=prior.gain if maco else None, offset=prior.offset if maco else None, device=device)


def penalties(reg: Regularisers, prior: Prior):
    """The weighted penalties of ``reg`` (to subtract), or None."""
    terms = O.regularisers(reg.l1, reg.l2, reg.tv, reg.blur)
    if reg.prior:
        g = reg.prior * O.gaussian_prior(prior.basis)
        terms = g if terms is None else terms + g
    return terms


def _transforms(s: SynthesisConfig, size: int) -> Transforms:
    t = s.transforms
    if not t.enabled:
        return Transforms.off()
    return Transforms.from_fractions(size, t.pad, t.pad_mode, t.jitter, t.scale, t.rotate, crop=t.crop, noise=t.noise,
                                     copies=t.copies)


def _attach_dataset_best(ctx: Context, cfg: SynthesizeStage, rows: list[dict], layers: list[str]) -> None:
    """Fill ``dataset_activation``, ``dataset_peak`` and ``dataset_source`` of channel rows: from the
    activations stage when it covered the channel (source ``activations``), else computed on ``cfg.data.split``."""
    if not rows:
        return
    known = activations_best(ctx.run.path)
    missing = sorted({r["layer"] for r in rows if (r["layer"], r["channel"]) not in known}, key=layers.index)
    computed = {}
    if missing:
        log.info("synthesis: no activations stage outputs for %s; computing the best dataset activation on the %s split",
                 ", ".join(missing), cfg.data.split)
        loader = DataLoader(ctx.dataset, batch_size=cfg.data.batch_size, shuffle=False)
        computed = dataset_best(ctx.run.model, loader, missing, ctx.device)
    for r in rows:
        key = (r["layer"], r["channel"])
        if key in known:
            (r["dataset_activation"], r["dataset_peak"]), r["dataset_source"] = known[key], "activations"
        else:
            mean, peak = computed[r["layer"]]
            r["dataset_activation"], r["dataset_peak"] = float(mean[r["channel"]]), float(peak[r["channel"]])
            r["dataset_source"] = f"computed:{cfg.data.split}"


COLUMNS = ["kind", "layer", "channel", "facet", "class", "image", "objective_name", "objective", "activation",
           "dataset_activation", "margin", "ratio", "out_activates", "activation_peak", "dataset_peak", "margin_peak",
           "ratio_peak", "out_activates_peak", "probability", "predicted", "saturation", "saturated",
           "source_saturation", "source_index", "distance", "dataset_source", "failed_step"]


def metrics_table(rows: list[dict]) -> pd.DataFrame:
    """One row per image. Against the best dataset image: ``margin = activation - dataset_activation``
    (spatial means), ``margin_peak = activation_peak - dataset_peak`` (maxima over positions),
    ``out_activates(_peak)``: margin > 0. ``ratio(_peak)``: activation / dataset value only where that
    value is > 0 (a ratio against a value <= 0 has no meaning: NaN there). A failed image (``failed_step``
    >= 0) has NaN activations and margins and ``out_activates`` False: it found nothing."""
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for col in ("channel", "facet", "class", "predicted", "source_index"):
        df[col] = df[col].astype("Int64")
    for col in ("objective", "activation", "dataset_activation", "activation_peak", "dataset_peak", "probability",
                "saturation", "source_saturation", "distance"):
        df[col] = df[col].astype("float64")
    df["saturated"] = df["saturated"].astype("boolean")
    for col in ("dataset_source", "objective_name"):
        df[col] = df[col].astype("string")
    failed = df["failed_step"] >= 0
    df.loc[failed, ["objective", "activation", "activation_peak"]] = np.nan
    for suffix in ("", "_peak"):
        act, ref = df["activation" + suffix], df["dataset_activation" if not suffix else "dataset_peak"]
        df["margin" + suffix] = act - ref
        df["ratio" + suffix] = (act / ref).where(ref > 0)
        out = (df["margin" + suffix] > 0).astype("boolean")
        out[ref.isna()] = pd.NA  # nothing to compare with (dream and class rows have no peak)
        out[failed & ref.notna()] = False
        df["out_activates" + suffix] = out
    return df


def _median(s: pd.Series) -> float | None:
    v = s.dropna()
    return float(v.median()) if len(v) else None


def compare_to_dataset(g: pd.DataFrame) -> dict:
    """Channel images ``g`` (rows of :func:`metrics_table`) against the best dataset image, at the spatial
    mean and at the peak: the share that out-activates it (Wilson interval, with ``k``; failed images count
    as not out-activating), the median margin, the mean margin with its t interval and sign-flip p
    (:func:`probe.uncertainty.paired_comparison`), and the median ratio over the channels where the best
    dataset value is > 0 (``ratio_defined`` of them)."""
    out: dict = {"channels": int(len(g))}
    for tag, suffix, ref in (("mean", "", "dataset_activation"), ("peak", "_peak", "dataset_peak")):
        known = g[g[ref].notna()]
        if not len(known):
            continue
        k = int(known["out_activates" + suffix].fillna(False).sum())
        out[f"out_activates_{tag}"] = {**proportion_interval(k, len(known)).to_dict(), "k": k}
        ok = known[known["margin" + suffix].notna()]
        out[f"median_margin_{tag}"] = _median(ok["margin" + suffix])
        if len(ok):
            out[f"margin_{tag}"] = paired_comparison(ok["activation" + suffix], ok[ref]).to_dict()
        out[f"median_ratio_{tag}"] = _median(ok["ratio" + suffix])
        out[f"ratio_defined_{tag}"] = int(ok["ratio" + suffix].notna().sum())
    return {k: v for k, v in out.items() if v is not None}


def share(flags: pd.Series) -> dict:
    """The share of True in ``flags`` with Wilson's interval and ``k``."""
    k = int(flags.fillna(False).astype(bool).sum())
    return {**proportion_interval(k, len(flags)).to_dict(), "k": k}


def summary_metrics(df: pd.DataFrame, saturation_limit: float) -> dict:
    """Small dict for ``dvc metrics``: per channel layer (and ``all``) :func:`compare_to_dataset` and the share of
    saturated images; the class images' probability (mean, min) and how many the model predicts as their class
    (which other runs recognise them is ``probe compare``'s transfer matrix); accentuation's gain over its exemplars; Deep Dream's gain and
    saturation against its source images."""
    out: dict = {"saturation_limit": saturation_limit}
    ch = df[df["kind"] == "channel"]
    if len(ch):
        out["channel"] = {layer: {**compare_to_dataset(g), "saturated": share(g["saturated"])}
                          for layer, g in ch.groupby("layer", sort=False)}
        out["channel"]["all"] = {**compare_to_dataset(ch), "saturated": share(ch["saturated"])}
    cl = df[df["kind"] == "class"]
    if len(cl):
        ok = cl[cl["probability"].notna()]
        hit = int((ok["predicted"] == ok["class"]).sum())
        out["class_probability"] = {"classes": int(len(cl)), "mean": _finite_or_none(ok["probability"].mean()),
                                    "min": _finite_or_none(ok["probability"].min()),
                                    "predicted": {**proportion_interval(hit, len(cl)).to_dict(), "k": hit}}
        out["class_probability"] = {k: v for k, v in out["class_probability"].items() if v is not None}
        out["class_saturated"] = share(cl["saturated"])
    ac = df[df["kind"] == "accentuated"]
    if len(ac):
        out["accentuated"] = {layer: {"out_activates": share(g["out_activates"]), "distance": float(g["distance"].mean()),
                                      "saturated": share(g["saturated"])} for layer, g in ac.groupby("layer", sort=False)}
    dr = df[df["kind"] == "dream"]
    if len(dr):
        out["dream_gain"] = {"mean": float(dr["ratio"].mean()), "min": float(dr["ratio"].min())}
        out["dream_saturation"] = {"mean": float(dr["saturation"].mean()), "source_mean": float(dr["source_saturation"].mean()),
                                   "saturated": share(dr["saturated"])}
    out["failed_images"] = {"count": int((df["failed_step"] >= 0).sum())}
    return out


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def run(cfg: SynthesizeStage) -> Path:
    """Render everything ``cfg.synthesis`` asks for and write ``<run>/synthesis/``."""
    ctx = open_run(cfg)
    s = cfg.synthesis
    model = ctx.run.model
    size = s.image_size or ctx.data.image_size
    channels = ctx.data.channels
    prior = training_prior(ctx.data, s, size)
    layers = check_layers(model, s.layers, key="synthesis.layers") if s.layers else spaced_convs(model)
    dream_layer = s.dream.layer or middle_conv(model)
    widths = layer_widths(model, layers, channels, size, ctx.device) if layers else {}

    rows, arrays = [], {"color_sqrt": prior.color.numpy()}
    if prior.magnitude is not None:
        arrays["maco_magnitude"] = prior.magnitude.numpy()
    ch_rows, ch_arrays = render_channels(ctx, s, layers, widths, size, prior, cfg.seed)
    arrays.update(ch_arrays)
    _attach_dataset_best(ctx, cfg, ch_rows, layers)
    rows += ch_rows
    if s.class_images.enabled:
        cl_rows, cl_arrays = render_classes(ctx, s, size, prior, cfg.seed)
        rows += cl_rows
        arrays.update(cl_arrays)
    if s.accentuate.enabled and ch_rows:
        ac_rows, ac_arrays = accentuate_exemplars(ctx, s, ch_rows, prior, cfg.seed, cfg.data.split)
        rows += ac_rows
        arrays.update(ac_arrays)
    if s.dream.enabled and dream_layer is not None:
        check_layers(model, [dream_layer], key="synthesis.dream.layer")
        dr_rows, dr_arrays = render_dreams(ctx, s, dream_layer, cfg.seed)
        rows += dr_rows
        arrays.update(dr_arrays)
    for r in rows:  # every image judged for saturation (:func:`probe.synthesis.judge.saturation`)
        if r["kind"] in ("channel", "class", "accentuated", "dream", "zoom"):
            r["saturation"] = float(J.saturation(arrays[r["kind"]][r["image"]][None])[0])
            r["saturated"] = r["saturation"] > prior.saturation_limit
        if r["kind"] in ("dream", "zoom"):
            r["source_saturation"] = float(J.saturation(arrays["dream_source"][r["image"] if r["kind"] == "dream" else 0][None])[0])

    df = metrics_table(rows)
    metrics = summary_metrics(df, prior.saturation_limit)
    bad = df[df["failed_step"] >= 0]
    for r in bad.itertuples():
        log.warning("synthesis: %s image %s of %s went non-finite at step %d (kept as NaN in metrics)",
                    r.kind, r.image, r.layer, r.failed_step)
    with staged_dir(ctx.run.path / "synthesis") as tmp:
        write_npz(tmp / "images.npz", {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
        df.to_parquet(tmp / "metrics.parquet", index=False)
        write_json(tmp / "metrics.json", stamped(ctx.run.path, metrics))
        for layer in layers:
            sel = df[(df["kind"] == "channel") & (df["layer"] == layer)]["image"].to_numpy()
            if len(sel):
                grid_png(tmp / f"channels_{layer}.png", arrays["channel"][sel])
        for key in ("class", "zoom"):
            if key in arrays and len(arrays[key]):
                grid_png(tmp / f"{key}.png", arrays[key], cols=len(arrays[key]))
        if "dream" in arrays and len(arrays["dream"]):
            pairs = np.concatenate([arrays["dream_source"], arrays["dream"]])
            grid_png(tmp / "dream.png", pairs, cols=len(arrays["dream"]))
    for layer, m in metrics.get("channel", {}).items():
        log.info("synthesis: %s: %s of %s channels out-activate the best dataset image at the mean, %s at the peak",
                 layer, m.get("out_activates_mean", {}).get("k"), m["channels"], m.get("out_activates_peak", {}).get("k"))
    if "class_probability" in metrics:
        log.info("synthesis: class images %s", metrics["class_probability"])
    return ctx.run.path / "synthesis"
