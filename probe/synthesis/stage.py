"""``probe synthesize``: channel images, class images and Deep Dream for one run dir -> ``<run>/synthesis/``.

Outputs: ``images.npz`` (arrays ``channel``, ``class``, ``dream``, ``dream_source``, ``zoom``: pixels in
[0, 1], ``(N, C, H, W)``; ``color_sqrt``), ``metrics.parquet`` (one row per image; ``kind`` + ``image``
index into the array of that kind), ``metrics.json`` (DVC metrics) and PNG grids.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from probe.analysis import Context, open_run
from probe.capture import resolve_layers
from probe.rundir import staged_dir, write_json, write_npz
from probe.synthesis import objectives as O
from probe.synthesis.config import SynthesisConfig, SynthesizeStage, select_indices
from probe.synthesis.dream import deep_dream_octaves, zoom_frames
from probe.synthesis.outputs import grid_png
from probe.synthesis.param import ImageParam, color_sqrt_from_data
from probe.synthesis.render import forward_capture, frozen, render
from probe.synthesis.transform import Transforms

log = logging.getLogger(__name__)

EXEMPLARS = Path("activations") / "exemplars.parquet"
MAX_DEFAULT_CONVS = 20  # models with more convs get DEFAULT_FEW evenly spaced ones by default
DEFAULT_FEW = 3


def stable_seed(*parts) -> int:
    """A seed from names and numbers that does not depend on Python's hash randomisation."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def default_layers(model: nn.Module) -> list[str]:
    """Every Conv2d; for models with more than 20, three evenly spaced ones (early, middle, late)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) <= MAX_DEFAULT_CONVS:
        return convs
    picks = [round((i + 1) * len(convs) / (DEFAULT_FEW + 1)) for i in range(DEFAULT_FEW)]
    return [convs[i] for i in picks]


def layer_widths(model: nn.Module, layers: list[str], channels: int, size: int, device) -> dict[str, int]:
    """Number of channels (or units) in each layer's output for a ``channels x size x size`` input."""
    with torch.no_grad(), frozen(model):
        acts = forward_capture(model, torch.zeros(1, channels, size, size, device=device), layers)
    return {k: int(v.shape[1]) for k, v in acts.items()}


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` -> ``(N, C)``: each channel's mean over its positions."""
    return t.flatten(2).mean(2) if t.dim() > 2 else t


def dataset_top1(model: nn.Module, loader: DataLoader, layers: list[str], device) -> dict[str, torch.Tensor]:
    """Per layer, ``(C,)``: the largest channel spatial mean over every image of ``loader``."""
    best: dict[str, torch.Tensor] = {}
    with torch.no_grad(), frozen(model):
        for x, _ in loader:
            acts = forward_capture(model, x.to(device), layers)
            for name, t in acts.items():
                m = spatial_mean(t).amax(0).cpu()
                best[name] = m if name not in best else torch.maximum(best[name], m)
    return best


def exemplar_top1(run_dir: Path) -> dict[tuple[str, int], float]:
    """``(layer, channel) -> value`` of the rank-0 exemplar, from the activations stage when it ran."""
    path = run_dir / EXEMPLARS
    if not path.is_file():
        return {}
    df = pd.read_parquet(path, columns=["layer", "channel", "rank", "value"])
    top = df[df["rank"] == 0]
    return {(str(r.layer), int(r.channel)): float(r.value) for r in top.itertuples()}


def render_channels(ctx: Context, s: SynthesisConfig, layers: list[str], widths: dict[str, int], size: int,
                    color: torch.Tensor, seed: int) -> tuple[list[dict], np.ndarray]:
    """All chosen channels of every layer, ``s.batch_size`` images per optimisation batch."""
    model, channels = ctx.run.model, ctx.data.channels
    transforms = _transforms(s, size)
    rows, images, count = [], [], 0
    for layer in layers:
        chosen = select_indices("synthesis.channels", s.channels, widths[layer])
        log.info("synthesis: %s, %d channels, %d steps", layer, len(chosen), s.steps)
        for start in range(0, len(chosen), s.batch_size):
            chunk = chosen[start:start + s.batch_size]
            param = _param(s, len(chunk), channels, size, color, [stable_seed(seed, layer, c) for c in chunk], ctx.device)
            objective = O.channel(layer, chunk, s.objective)
            reg = O.regularisers(s.reg.l1, s.reg.l2, s.reg.tv, s.reg.blur)
            if reg is not None:
                objective = objective - reg
            res = render(model, objective, param, steps=s.steps, lr=s.lr, mean=ctx.data.mean, std=ctx.data.std,
                         transforms=transforms, seed=stable_seed(seed, layer, "chunk", start),
                         redirect_relu_steps=s.redirect_relu_steps, on_nan=s.on_nan,
                         labels=[f"layer {layer} channel {c}" for c in chunk])
            act = spatial_mean(res.acts[layer])
            for i, c in enumerate(chunk):
                rows.append({"kind": "channel", "layer": layer, "channel": c, "image": count + i,
                             "objective": float(res.objective[i]), "activation": float(act[i, c]),
                             "failed_step": int(res.failed_step[i])})
            images.append(res.pixels.numpy())
            count += len(chunk)
    return rows, np.concatenate(images) if images else np.zeros((0, channels, size, size), np.float32)


def render_classes(ctx: Context, s: SynthesisConfig, size: int, color: torch.Tensor, seed: int) -> tuple[list[dict], np.ndarray]:
    """One image per chosen class, maximising its logit (or log-probability), with the probability reached."""
    c = s.class_images
    classes = select_indices("synthesis.class_images.classes", c.classes, ctx.data.num_classes)
    param = _param(s, len(classes), ctx.data.channels, size, color, [stable_seed(seed, "class", k) for k in classes], ctx.device)
    objective = O.class_logit(classes) if c.objective == "logit" else O.class_log_prob(classes)
    reg = O.regularisers(c.reg.l1, c.reg.l2, c.reg.tv, c.reg.blur)
    if reg is not None:
        objective = objective - reg
    log.info("synthesis: %d class images, %d steps", len(classes), c.steps)
    res = render(ctx.run.model, objective, param, steps=c.steps, lr=c.lr, mean=ctx.data.mean, std=ctx.data.std,
                 transforms=_transforms(s, size), seed=stable_seed(seed, "class"), redirect_relu_steps=s.redirect_relu_steps,
                 on_nan=s.on_nan, labels=[f"class {k} ({ctx.data.classes[k]})" for k in classes])
    logits = res.acts[O.LOGITS]
    prob = torch.softmax(logits.double(), dim=1)  # lenet5 gives log-probs: softmax(log_softmax(z)) = softmax(z)
    rows = [{"kind": "class", "layer": O.LOGITS, "class": k, "image": i, "objective": float(res.objective[i]),
             "activation": float(logits[i, k]), "probability": float(prob[i, k]),
             "predicted": int(prob[i].argmax()), "failed_step": int(res.failed_step[i])} for i, k in enumerate(classes)]
    return rows, res.pixels.numpy()


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
    norm = lambda x: _dream_norm(model, layer, x, ctx)  # noqa: E731
    before, after, zoomed = norm(src), norm(dreams), norm(frames) if len(frames) else torch.zeros(0)
    rows = [{"kind": "dream", "layer": layer, "class": int(ctx.probe_y[p]), "image": i, "objective": float(after[i]),
             "activation": float(after[i]), "dataset_activation": float(before[i]), "dataset_source": "probe_image",
             "failed_step": -1} for i, p in enumerate(idx)]
    rows += [{"kind": "zoom", "layer": layer, "class": int(ctx.probe_y[idx[0]]), "image": f, "objective": float(zoomed[f]),
              "activation": float(zoomed[f]), "dataset_activation": float(before[0]), "dataset_source": "probe_image",
              "failed_step": -1} for f in range(len(frames))]
    arrays = {"dream": dreams.cpu().numpy(), "dream_source": src.cpu().numpy(), "zoom": frames.cpu().numpy()}
    return rows, arrays


def _dream_norm(model, layer, pixels, ctx) -> torch.Tensor:
    from probe.synthesis.render import Normalize

    with torch.no_grad(), frozen(model):
        acts = forward_capture(model, Normalize(ctx.data.mean, ctx.data.std)(pixels), [layer])
    return O.deep_dream(layer)(acts, pixels).cpu()


def _param(s: SynthesisConfig, n, channels, size, color, seeds, device) -> ImageParam:
    p = s.param
    return ImageParam(n, channels, size, kind=p.kind, color=color, decay_power=p.decay_power, init_sd=p.init_sd,
                      seeds=seeds, device=device)


def _transforms(s: SynthesisConfig, size: int) -> Transforms:
    t = s.transforms
    if not t.enabled:
        return Transforms.off()
    return Transforms.from_fractions(size, t.pad, t.pad_mode, t.jitter, t.scale, t.rotate)


def _attach_dataset_top1(ctx: Context, cfg: SynthesizeStage, rows: list[dict], layers: list[str]) -> None:
    """Fill ``dataset_activation``, ``ratio`` and ``dataset_source`` of channel rows."""
    if not rows:
        return
    known = exemplar_top1(ctx.run.path)
    missing = sorted({r["layer"] for r in rows if (r["layer"], r["channel"]) not in known}, key=layers.index)
    computed = {}
    if missing:
        log.info("synthesis: no exemplars for %s; computing the top-1 dataset activation on the %s split",
                 ", ".join(missing), cfg.data.split)
        loader = DataLoader(ctx.dataset, batch_size=cfg.data.batch_size, shuffle=False)
        computed = dataset_top1(ctx.run.model, loader, missing, ctx.device)
    for r in rows:
        key = (r["layer"], r["channel"])
        if key in known:
            r["dataset_activation"], r["dataset_source"] = known[key], str(EXEMPLARS)
        else:
            r["dataset_activation"], r["dataset_source"] = float(computed[r["layer"]][r["channel"]]), f"computed:{cfg.data.split}"


COLUMNS = ["kind", "layer", "channel", "class", "image", "objective", "activation", "dataset_activation", "ratio",
           "out_activates", "probability", "predicted", "dataset_source", "failed_step"]


def metrics_table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for col in ("channel", "class", "predicted"):
        df[col] = df[col].astype("Int64")
    for col in ("objective", "activation", "dataset_activation", "probability"):
        df[col] = df[col].astype("float64")
    df["dataset_source"] = df["dataset_source"].astype("string")
    failed = df["failed_step"] >= 0
    df.loc[failed, ["objective", "activation"]] = np.nan
    df["ratio"] = df["activation"] / df["dataset_activation"]
    df["out_activates"] = (df["activation"] > df["dataset_activation"]).astype("boolean")
    df.loc[df["dataset_activation"].isna() | failed, "out_activates"] = pd.NA
    return df


def summary_metrics(df: pd.DataFrame) -> dict:
    """Small, two-level dict of numbers for ``dvc metrics``."""
    out: dict = {}
    ch = df[df["kind"] == "channel"]
    if len(ch):
        frac = {layer: float(g["out_activates"].fillna(False).mean()) for layer, g in ch.groupby("layer", sort=False)}
        frac["all"] = float(ch["out_activates"].fillna(False).mean())
        out["channel_out_activates"] = frac
        out["channel_median_ratio"] = {layer: float(g["ratio"].median()) for layer, g in ch.groupby("layer", sort=False)}
    cl = df[df["kind"] == "class"]
    if len(cl):
        out["class_probability"] = {"mean": float(cl["probability"].mean()), "min": float(cl["probability"].min()),
                                    "frac_predicted": float((cl["predicted"] == cl["class"]).mean())}
    dr = df[df["kind"] == "dream"]
    if len(dr):
        out["dream_gain"] = {"mean": float(dr["ratio"].mean()), "min": float(dr["ratio"].min())}
    out["failed_images"] = {"count": int((df["failed_step"] >= 0).sum())}
    return out


def run(cfg: SynthesizeStage) -> Path:
    """Render everything ``cfg.synthesis`` asks for and write ``<run>/synthesis/``."""
    ctx = open_run(cfg)
    s = cfg.synthesis
    model = ctx.run.model
    size = s.image_size or ctx.data.image_size
    channels = ctx.data.channels
    color = (color_sqrt_from_data(ctx.data.train, ctx.data.mean, ctx.data.std, channels, s.color_samples)
             if s.param.decorrelate else torch.eye(channels))
    layers = resolve_layers(model, s.layers, key="synthesis.layers") if s.layers else default_layers(model)
    dream_layer = s.dream.layer or _middle_conv(model)
    widths = layer_widths(model, layers, channels, size, ctx.device) if layers else {}

    rows, arrays = [], {"color_sqrt": color.numpy()}
    ch_rows, arrays["channel"] = render_channels(ctx, s, layers, widths, size, color, cfg.seed)
    _attach_dataset_top1(ctx, cfg, ch_rows, layers)
    rows += ch_rows
    if s.class_images.enabled:
        cl_rows, arrays["class"] = render_classes(ctx, s, size, color, cfg.seed)
        rows += cl_rows
    if s.dream.enabled and dream_layer is not None:
        resolve_layers(model, [dream_layer], key="synthesis.dream.layer")
        dr_rows, dr_arrays = render_dreams(ctx, s, dream_layer, cfg.seed)
        rows += dr_rows
        arrays.update(dr_arrays)

    df = metrics_table(rows)
    metrics = summary_metrics(df)
    bad = df[df["failed_step"] >= 0]
    for r in bad.itertuples():
        log.warning("synthesis: %s image %s of %s went non-finite at step %d (kept as NaN in metrics)",
                    r.kind, r.image, r.layer, r.failed_step)
    with staged_dir(ctx.run.path / "synthesis") as tmp:
        write_npz(tmp / "images.npz", {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
        df.to_parquet(tmp / "metrics.parquet", index=False)
        write_json(tmp / "metrics.json", metrics)
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
    for k, v in metrics.items():
        log.info("synthesis: %s %s", k, {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()})
    return ctx.run.path / "synthesis"


def _middle_conv(model: nn.Module) -> str | None:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[(len(convs) - 1) // 2] if convs else None
