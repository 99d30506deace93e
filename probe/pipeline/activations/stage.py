"""``probe activations run=<run dir>``: writes ``<run>/activations/``.

Files: stats.parquet, class_means.parquet, hist.parquet, exemplars.parquet, exemplar_crops.npz,
filters.npz, feature_maps.npz, metrics.json, PNG grids (``activations.images=true``) and, with
``activations.save_state=true``, state.npz (the mergeable accumulators).

Sharded: ``probe activations run=<run> activations.shard=i/n`` streams only the i-th of n contiguous ranges of
whole batches of the split (:func:`shard_range`; exemplar indices stay global) and writes
``<run>/activations_shards/<i>-of-<n>/state.npz`` + ``shard.json`` (atomically);
``probe activations_merge run=<run> activations.shards=n`` checks that every shard is there and was computed
with the same layers, data, batch size, histogram settings and weights, merges them and writes the same
``activations/`` as one pass: every activation is the same bytes, so counts, min, max, histograms and exemplars
are exact, and float64 sums differ only in the order they were added (about 1e-16 relative). See stats.py for the definitions,
rectified.py for where dead units and class selectivity are defined, and :func:`metrics` for metrics.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from probe.pipeline.activations.config import ActivationsMergeStage, ActivationsStage, parse_shard
from probe.activations.exemplars import TopK, crop_boxes, crop_images
from probe.activations.grid import LogGrid
from probe.activations.pictures import (kernel_arrays, save_crop_grid, save_feature_map_grid,
                                        save_kernel_grids)
from probe.activations.population import collect
from probe.activations.stats import PopulationStats, selectivity
from probe.pipeline.analysis import Context, open_run
from probe.hooks import layer_outputs, resolve_layers
from probe.errors import RunDirError
from probe.pipeline.rundir import SHARDS_DIR, WEIGHTS_KEY, staged_dir, stamped, weights_digest
from probe.files import write_json, write_npz
from probe.runtime import pin_memory
from probe.uncertainty import proportion_interval

log = logging.getLogger(__name__)


def run(cfg: ActivationsStage) -> Path:
    """The whole split in one pass -> ``<run>/activations/``; with ``activations.shard=i/n`` only shard i -> its
    state."""
    ctx = open_run(cfg)
    model = ctx.run.model
    layers = resolve_layers(model, cfg.activations.layers, "activations.layers")
    shard = parse_shard(cfg.activations.shard)
    if shard is not None:
        return run_shard(cfg, ctx, layers, *shard)
    stats, tops = _collect(cfg, ctx, layers, ctx.dataset, 0)
    return write_outputs(cfg, ctx, layers, stats, tops)


def _num_classes(ctx: Context) -> int:
    return max(len(ctx.data.classes), int(ctx.labels.max()) + 1 if len(ctx.labels) else 0)


def _collect(cfg: ActivationsStage, ctx: Context, layers: list[str], dataset, start: int):
    a = cfg.activations
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, pin_memory=pin_memory(ctx.device))
    stats = collect(ctx.run.model, loader, layers, ctx.device, _num_classes(ctx),
                    LogGrid(a.hist_bits, a.hist_octaves), a.top_k, a.hist_stride, start=start, amp=a.amp)
    return stats, stats.exemplars


def write_outputs(cfg: ActivationsStage, ctx: Context, layers: list[str], stats: PopulationStats,
                  tops: dict[str, TopK]) -> Path:
    """Everything in ``<run>/activations/`` from the accumulated statistics (single pass or merged shards)."""
    model, a = ctx.run.model, cfg.activations
    seen = [n for n in layers if stats[n].channels is not None]
    for n in [n for n in layers if n not in seen]:
        log.warning("activations: layer %s produced no tensor output; skipped", n)
    fm_layers = resolve_layers(model, a.feature_map_layers, "activations.feature_map_layers") \
        if a.feature_map_layers else [n for n in seen if stats[n].shape != (1, 1)]

    out = ctx.run.path / "activations"
    with staged_dir(out) as tmp:
        write_tables(stats, tops, seen, ctx.labels, a.per_channel_hist, tmp)
        write_crops(ctx, tops, stats, seen, a.crop_channels, a.crop_size, a.images, tmp)
        write_filters(model, layers, a.images, tmp)
        write_feature_maps(ctx, fm_layers, a.images, tmp)
        write_json(tmp / "metrics.json", stamped(ctx.run.path, metrics(stats, seen)))
        if a.save_state:
            stats.save(tmp / "state.npz")
    log.info("%s: activations of %d layers over %d images", out, len(seen), len(ctx.dataset))
    return out


# -- sharded extraction ------------------------------------------------------------------------
def shard_range(total: int, i: int, n: int, batch: int = 1) -> tuple[int, int]:
    """Shard ``i`` of ``n``: a contiguous index range of the split made of whole batches of ``batch`` images
    (the split's ``B = ceil(N / batch)`` batches, shard i taking ``[i B // n, (i + 1) B // n)``; the last batch
    may be short). Each shard then forwards exactly the batches the single pass forwards, so every activation is
    the same bytes (a convolution's result can depend on the batch it is computed in), and shard sizes differ
    by at most one batch. Contiguous, not strided: each shard reads consecutive files.
    """
    blocks = -(-total // batch)
    return min(i * blocks // n * batch, total), min((i + 1) * blocks // n * batch, total)


def shard_dir(run: Path, i: int, n: int) -> Path:
    return Path(run) / SHARDS_DIR / f"{i}-of-{n}"


def _shard_key(cfg: ActivationsStage, ctx: Context, layers: list[str]) -> dict:
    """What every shard of one merge must share (the merge checks it)."""
    a = cfg.activations
    return {"images": len(ctx.dataset), "layers": list(layers), "split": cfg.data.split, "limit": cfg.data.limit,
            "top_k": a.top_k, "hist_bits": a.hist_bits, "hist_octaves": a.hist_octaves,
            "hist_stride": a.hist_stride, "num_classes": _num_classes(ctx), "amp": a.amp and ctx.device.type == "cuda",
            "batch_size": cfg.data.batch_size,
            WEIGHTS_KEY: weights_digest(ctx.run.path)}


def run_shard(cfg: ActivationsStage, ctx: Context, layers: list[str], i: int, n: int) -> Path:
    """Statistics of shard ``i`` of ``n`` -> ``<run>/activations_shards/<i>-of-<n>/{state.npz, shard.json}``."""
    lo, hi = shard_range(len(ctx.dataset), i, n, cfg.data.batch_size)
    stats, _ = _collect(cfg, ctx, layers, Subset(ctx.dataset, list(range(lo, hi))), lo)
    out = shard_dir(ctx.run.path, i, n)
    with staged_dir(out) as tmp:
        stats.save(tmp / "state.npz")
        write_json(tmp / "shard.json", {"shard": i, "shards": n, "start": lo, "stop": hi, **_shard_key(cfg, ctx, layers)})
    log.info("%s: activations shard %d/%d (images %d..%d of %d)", out, i, n, lo, hi, len(ctx.dataset))
    return out


def merge(cfg: ActivationsMergeStage) -> Path:
    """``probe activations_merge run=<run> activations.shards=<n>``: shards 0..n-1 -> the single-pass
    ``activations/``."""
    ctx = open_run(cfg)
    layers = resolve_layers(ctx.run.model, cfg.activations.layers, "activations.layers")
    n, key = cfg.activations.shards, _shard_key(cfg, ctx, layers)
    folders = [shard_dir(ctx.run.path, i, n) for i in range(n)]
    missing = [str(f / "state.npz") for f in folders if not (f / "state.npz").is_file() or not (f / "shard.json").is_file()]
    if missing:
        raise RunDirError(f"activations_merge: {len(missing)} of {n} shards missing: {', '.join(missing)} "
                          f"(run `probe activations run={cfg.run} activations.shard=<i>/{n}` for each)")
    stats = None
    for i, f in enumerate(folders):
        info = json.loads((f / "shard.json").read_text())
        diff = sorted(k for k in key if info.get(k) != key[k])
        if diff:
            raise RunDirError(f"{f}: shard computed with other {', '.join(diff)} than this merge "
                              "(rerun it with the same activations.layers/data/histogram settings on the same "
                              "weights)")
        expected = shard_range(key["images"], i, n, key["batch_size"])
        if (info["start"], info["stop"]) != expected:
            raise RunDirError(f"{f}: covers images {info['start']}..{info['stop']}, expected {expected}")
        shard = PopulationStats.load(f / "state.npz")
        stats = shard if stats is None else stats.merge(shard)
    log.info("activations_merge: %d shards of %s", n, ctx.run.path)
    return write_outputs(cfg, ctx, layers, stats, stats.exemplars)


def write_tables(stats: PopulationStats, tops: dict[str, TopK], layers: list[str], labels: np.ndarray,
                 per_channel_hist: bool, folder: Path) -> None:
    frames = {"stats": [], "class_means": [], "hist": [], "exemplars": []}
    for n in layers:
        s = stats[n]
        frames["stats"].append(s.to_frame())
        frames["class_means"].append(s.class_frame())
        frames["hist"].append(s.hist_frame(per_channel_hist))
        frames["exemplars"].append(tops[n].to_frame(s.shape[1], labels))
    for name, parts in frames.items():
        pd.concat(parts, ignore_index=True).to_parquet(folder / f"{name}.parquet", index=False)


def metrics(stats: PopulationStats, layers: list[str]) -> dict:
    """``activations/metrics.json`` (DVC metrics: numbers, small dicts, one list of names).

    Dead units and selectivity only for layers with a rectified response (``rectified`` not null in
    stats.parquet; :mod:`probe.activations.rectified`):

    - ``dead_fraction`` {layer: dead / units}, ``dead_units`` {layer: {"dead": k, "units": n}}: units whose
      rectified response is never > 0 over the split.
    - ``dead_fraction_layers``: the layers the pooled figures cover: those with a rectified response, each
      rectifier once (a conv, its BN and their ReLU, when all are analysed, name the same units: the first
      in layer order counts; with the default layers, conv / linear / pooling, that never happens).
    - ``dead_fraction_mean``: the pooled fraction sum k / sum n over ``dead_fraction_layers`` (each unit counts
      once; null when no layer has a rectified response), ``dead_fraction_interval``: its 95% Wilson interval
      (:func:`probe.uncertainty.proportion_interval`; it treats units as independent draws).
    - ``selectivity_median`` {layer: median over units of the class selectivity index of the rectified
      response}, where at least one unit has one (dead units have none).
    - ``sparsity`` {layer: 1 - mean over units of frac_active}: the share of positions where the layer's *own
      output* is <= 0, for every analysed layer (for a conv -> bn -> relu that is the conv's sign, not the
      ReLU's), and ``sparsity_mean``: its unweighted mean over all analysed layers (pooling and logits included);
      ``sparsity_rectified`` {layer: share of zero positions of the rectified response} where there is one.
    """
    dead, dead_units, sparsity, sparsity_rect, sel = {}, {}, {}, {}, {}
    for n in layers:
        s = stats[n]
        sparsity[n] = float(1 - s.frac_active().mean())
        d = s.dead()
        if d is None:
            continue
        dead_units[n] = {"dead": int(d.sum()), "units": int(len(d))}
        dead[n] = float(d.mean())
        sparsity_rect[n] = float(1 - s.active_rect.cpu().numpy().mean() / max(s.count, 1))
        si = selectivity(s.class_means(rectified=True))
        if np.isfinite(si).any():
            sel[n] = float(np.nanmedian(si))
    pooled, seen = [], set()
    for n in dead_units:
        sites = set(stats[n].rectified.sites)
        if not sites & seen:
            pooled.append(n)
        seen |= sites
    k = sum(dead_units[n]["dead"] for n in pooled)
    units = sum(dead_units[n]["units"] for n in pooled)
    return {"dead_fraction": dead, "dead_units": dead_units, "dead_fraction_layers": pooled,
            "dead_fraction_mean": k / units if units else None,
            "dead_fraction_interval": proportion_interval(k, units).to_dict() if units else None,
            "selectivity_median": sel, "sparsity": sparsity, "sparsity_rectified": sparsity_rect,
            "sparsity_mean": float(np.mean(list(sparsity.values()))) if sparsity else None}


def unit_geometry(ctx: Context, layers: list[str]) -> dict[str, tuple]:
    """Per layer: receptive field (h, w), rf stride (h, w) from the run card, centre of unit (0, 0) in pixels."""
    card = {r["name"]: r for r in ctx.run.card.get("layers", [])}
    try:
        from probe.models.summary import receptive_fields

        example = ctx.probe_x[:1].to(ctx.device)
        fields = receptive_fields(ctx.run.model, example)
    except Exception:  # models fx cannot trace: assume maps centred on the input
        fields = {}
    size = ctx.probe_x.shape[-2:]
    geo = {}
    for n in layers:
        row = card.get(n, {})
        rf, stride = row.get("receptive_field"), row.get("rf_stride")
        if n in fields:
            fh, fw = fields[n]
            rf, stride, c0 = rf or [round(fh.r), round(fw.r)], stride or [round(fh.j), round(fw.j)], (fh.c, fw.c)
        else:
            rf, stride = rf or list(size), stride or [1, 1]
            c0 = None
        geo[n] = (tuple(rf), tuple(stride), c0)
    return geo


def write_crops(ctx: Context, tops: dict[str, TopK], stats: PopulationStats, layers: list[str],
                crop_channels: int | None, crop_size: int, images: bool, folder: Path) -> None:
    """Crops around the max location of each exemplar, sized by the layer's receptive field."""
    geo = unit_geometry(ctx, layers)
    kept = {n: tops[n].state() for n in layers}
    needed = np.unique(np.concatenate([kept[n]["index"][:crop_channels].reshape(-1) for n in layers]))
    pixels = {int(i): ctx.data.denormalize(ctx.dataset[int(i)][0][None])[0].clamp(0, 1) for i in needed}
    H, W = ctx.probe_x.shape[-2:]
    arrays = {}
    for n in layers:
        k = kept[n]
        idx, am = k["index"][:crop_channels].astype(np.int64), k["argmax"][:crop_channels].astype(np.int64)
        C, K = idx.shape
        h, w = stats[n].shape
        rf, stride, c0 = geo[n]
        if c0 is None:  # centre the map on the input
            c0 = ((H - 1) / 2 - (h - 1) / 2 * stride[0], (W - 1) / 2 - (w - 1) / 2 * stride[1])
        boxes = crop_boxes((am // w).reshape(-1), (am % w).reshape(-1), rf, stride, c0, (H, W))
        crops = crop_images(torch.stack([pixels[int(i)] for i in idx.reshape(-1)]), boxes, crop_size)
        arrays[f"{n}/crops"] = crops.reshape(C, K, *crops.shape[1:])
        arrays[f"{n}/boxes"] = boxes.reshape(C, K, 4)  # top, left, height, width in input pixels
        if images:
            save_crop_grid(n, arrays[f"{n}/crops"], folder)
    write_npz(folder / "exemplar_crops.npz", arrays)


def write_filters(model: torch.nn.Module, layers: list[str], images: bool, folder: Path) -> None:
    arrays = kernel_arrays(model, layers)
    write_npz(folder / "filters.npz", arrays)
    if images:
        save_kernel_grids(arrays, folder)


@torch.no_grad()
def write_feature_maps(ctx: Context, layers: list[str], images: bool, folder: Path) -> None:
    """Activations of ``layers`` for the fixed probe images (float16), plus the images themselves."""
    _, outputs = layer_outputs(ctx.run.model, ctx.probe_x.to(ctx.device), layers, output=False)
    arrays = {"probe_index": np.asarray(ctx.probe_index), "probe_labels": ctx.probe_y.numpy(),
              "probe_images": ctx.data.denormalize(ctx.probe_x).clamp(0, 1).numpy().astype(np.float16)}
    for n in layers:
        if n in outputs:
            arrays[n] = outputs[n].float().cpu().numpy().astype(np.float16)
            if images and arrays[n].ndim == 4:
                save_feature_map_grid(n, arrays[n], arrays["probe_labels"], folder)
    write_npz(folder / "feature_maps.npz", arrays)
