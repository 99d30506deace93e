"""``probe geometry run=<run dir>``: equivariance, invariance, effective receptive fields and
training dynamics of one run, written to ``<run>/geometry/``."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from probe.pipeline.analysis import open_run
from probe.hooks import batched_layer_outputs, middle_conv, module_types, resolve_layers
from probe.geometry import figures
from probe.pipeline.geometry.config import GeometryStage
from probe.geometry.dynamics import dynamics_table, snapshot_images, snapshot_paths
from probe.geometry.erf import erf_maps, erf_rms, erf_size
from probe.geometry.fields import LayerField, layer_fields
from probe.geometry.invariance import transforms
from probe.geometry.tables import transform_tables
from probe.pipeline.rundir import staged_dir, stamped
from probe.files import write_json, write_npz
from probe.uncertainty import proportion_interval

log = logging.getLogger(__name__)


def call_order(card: dict, layers: list[str]) -> list[str]:
    """``layers`` in the order the forward pass calls them (the card's layer table), others last."""
    order = {r["name"]: i for i, r in enumerate(card.get("layers", []))}
    return sorted(layers, key=lambda n: (order.get(n, len(order)), layers.index(n)))


def erf_table(maps: dict[str, dict], fields: dict[str, LayerField], card: dict, types: dict[str, str],
              layers: list[str], mass: float, image_size: int) -> pd.DataFrame:
    """One row per (input kind, layer): ERF side (smallest centred square holding ``mass``), radius
    (smallest disc), RMS spread, the theoretical RF (side) and the ratio of ERF to TRF side."""
    trf_card = {r["name"]: r.get("receptive_field") for r in card.get("layers", [])}
    rows = []
    for kind, per_layer in maps.items():
        for name, (m, (uy, ux)) in per_layer.items():
            f = fields[name]
            centre = None if f.centre0 is None else (f.centre0[0] + uy * f.stride[0], f.centre0[1] + ux * f.stride[1])
            side, radius = erf_size(m, centre, mass)
            trf = trf_card.get(name) or (list(f.trf) if f.trf else None)
            trf_side = float(max(trf)) if trf else float("nan")
            rows.append({"input": kind, "layer": name, "type": types[name], "depth": layers.index(name),
                         "erf_side": side, "erf_radius": radius, "erf_rms": erf_rms(m, centre), "mass": mass, "trf": trf_side,
                         "erf_trf_ratio": side / trf_side if trf_side == trf_side else float("nan"),
                         "trf_in_image": min(trf_side, image_size), "image_size": image_size,
                         "centre_y": float("nan") if centre is None else centre[0],
                         "centre_x": float("nan") if centre is None else centre[1]})
    return pd.DataFrame(rows)


def deepest_conv(table: pd.DataFrame, fields: dict[str, LayerField]) -> str | None:
    """The conv of ``table`` with the largest theoretical field, the later one on ties (a ResNet's
    shortcut conv is called after the block's last conv but sees less)."""
    convs = table[table["type"] == "Conv2d"].drop_duplicates("layer").sort_values("depth")["layer"].tolist()
    if not convs:
        return None
    return max(reversed(convs), key=lambda n: max(fields[n].trf) if fields[n].trf else 0)


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def equivariance_headline(eq: pd.DataFrame) -> dict[str, dict]:
    """Per layer with a spatial output, by name: its depth (index in the layer list, in call order), map size
    (``map_h``, ``map_w``), stride, and at the
    smallest shift ``n`` of the table, per border mode, the error (``shift{n}_{mode}``) and the interior
    error (``shift{n}_{mode}_interior``), each the mean over the axes where the map can show it. A map too
    small for the shift (a 1x1 map) has ``measurable: false`` and no error: nothing else stands in for it."""
    out: dict[str, dict] = {}
    if eq.empty:
        return out
    n = int(eq.loc[eq["shift"].abs().idxmin(), "shift"])
    for name, g in eq.sort_values("depth", kind="stable").groupby("layer", sort=False):
        sel = g[g["shift"] == n]
        d = {"depth": int(g["depth"].iloc[0]), "map_h": int(g["map_h"].iloc[0]), "map_w": int(g["map_w"].iloc[0]),
             "stride": _finite(sel["stride"].max()), "measurable": bool(sel["measurable"].any())}
        for mode, m in sel[sel["measurable"]].groupby("mode", sort=True):
            d[f"shift{n}_{mode}"] = _finite(m["error"].mean())
            d[f"shift{n}_{mode}_interior"] = _finite(m["error_interior"].mean())
        out[str(name)] = {k: v for k, v in d.items() if v is not None}
    return out


def survival_headline(inv: pd.DataFrame) -> dict[str, dict]:
    """Per shift of the input (``shift{n}_{axis}_{mode}``): the probe images whose predicted class is unchanged,
    ``k`` of ``n`` with Wilson's interval (:func:`probe.uncertainty.proportion_interval`); the two axes are
    kept apart (the same images, so not independent trials). ``accuracy_clean``: correct on the untransformed
    images. ``chance_agreement``: ``sum_c p_c^2`` over the classes predicted on the untransformed images, the
    survival a shift would show if it replaced each image by a random other one (1 for a net that predicts one
    class for everything: there survival says nothing about shifts)."""
    out: dict[str, dict] = {}
    rows = inv[(inv["layer"] == "output") & (inv["transform"] == "shift")]
    for r in rows.sort_values(["mode", "axis", "amount"], kind="stable").itertuples():
        k, n = int(r.k), int(r.n)
        out[f"shift{int(r.amount)}_{r.axis}_{r.mode}"] = {**proportion_interval(k, n).to_dict(), "k": k}
    clean = inv[inv["layer"] == "output"]
    if len(clean):
        n = int(clean["n"].iloc[0])
        k = int(round(float(clean["accuracy_clean"].iloc[0]) * n))
        out["accuracy_clean"] = {**proportion_interval(k, n).to_dict(), "k": k}
    return out


def chance_agreement(pred: torch.Tensor) -> float:
    """``sum_c (n_c / n)^2`` of predicted classes ``pred`` ``(n,)``: how often two images drawn with replacement agree."""
    counts = torch.bincount(pred.flatten()).double()
    return float(((counts / counts.sum()) ** 2).sum())


def headline(eq: pd.DataFrame, inv: pd.DataFrame, erf: pd.DataFrame, fields: dict[str, LayerField],
             chance: float | None = None) -> dict:
    """Small dict for DVC, every layer named: ``equivariance`` (:func:`equivariance_headline`), ``survival``
    (:func:`survival_headline`), ``erf``: the ERF side and ERF/TRF ratio per input kind and the TRF of the
    conv with the largest theoretical field (:func:`deepest_conv`), under its name; ``chance``: the clean
    predictions' :func:`chance_agreement`, written under ``survival``."""
    out: dict[str, dict] = {"equivariance": equivariance_headline(eq), "survival": survival_headline(inv), "erf": {}}
    if chance is not None and out["survival"]:
        out["survival"]["chance_agreement"] = chance
    last = deepest_conv(erf, fields)
    if last is not None:
        sel = erf[erf["layer"] == last]
        d = {}
        for kind, g in sel.groupby("input"):
            d[f"erf_trf_ratio_{kind}"] = _finite(g["erf_trf_ratio"].iloc[0])
            d[f"erf_side_{kind}"] = _finite(g["erf_side"].iloc[0])
        d["trf"] = _finite(sel["trf"].iloc[0])
        out["erf"][last] = {k: v for k, v in d.items() if v is not None}
    return {k: d for k, d in out.items() if d}


def run(cfg: GeometryStage) -> Path:
    """Measure the run's geometry and write ``<run>/geometry/``; return that folder."""
    ctx = open_run(cfg)
    model, device, card, g = ctx.run.model, ctx.device, ctx.run.card, cfg.geometry
    layers = call_order(card, resolve_layers(model, g.layers, "geometry.layers"))
    x, y = ctx.probe_x, ctx.probe_y
    bs = cfg.data.batch_size
    mean, std = torch.tensor(ctx.data.mean).view(1, -1, 1, 1), torch.tensor(ctx.data.std).view(1, -1, 1, 1)
    fill = (0.0 - mean) / std  # black, normalised
    _, example_outs = batched_layer_outputs(model, x[:1], layers, bs, device)
    fields = layer_fields(model, x[:1].to(device), example_outs)
    types = module_types(model, layers)
    s = g.shift
    ts = transforms(s.shifts, s.axes, s.modes, g.invariance.rotations, g.invariance.scales, fill)
    eq, inv = transform_tables(model, x, layers, ts, y=y, fields=fields, batch_size=bs, device=device)

    inputs = {"probe": x}
    if g.erf.noise_images:
        gen = torch.Generator().manual_seed(cfg.seed)
        inputs["noise"] = torch.randn((g.erf.noise_images, *x.shape[1:]), generator=gen)
    maps = {k: erf_maps(model, v, layers, device) for k, v in inputs.items()}
    image_size = int(x.shape[-1])
    erf = erf_table(maps, fields, card, types, layers, g.erf.mass, image_size)

    snaps = snapshot_paths(ctx.run.path) if g.dynamics else []
    dyn, filters = dynamics_table(model, x, snaps, bs, device) if snaps else (None, {})
    conv = middle_conv(model)
    synth, synth_rows = {}, None
    if snaps and conv is not None and g.dynamics_steps and g.dynamics_channels:
        width = dict(model.named_modules())[conv].out_channels
        synth, synth_rows = snapshot_images(model, snaps, conv, list(range(min(g.dynamics_channels, width))),
                                            int(x.shape[1]), int(x.shape[-1]), ctx.data.mean, ctx.data.std,
                                            g.dynamics_steps, device)

    out_dir = ctx.run.path / "geometry"
    with staged_dir(out_dir) as tmp:
        eq.to_parquet(tmp / "equivariance.parquet", index=False)
        inv.to_parquet(tmp / "invariance.parquet", index=False)
        erf.to_parquet(tmp / "erf.parquet", index=False)
        write_npz(tmp / "erf_maps.npz", {f"{k}/{n}": m for k, per in maps.items() for n, (m, _) in per.items()})
        if dyn is not None:
            dyn.to_parquet(tmp / "dynamics.parquet", index=False)
            write_npz(tmp / "dynamics_filters.npz", filters)
        if synth:
            write_npz(tmp / "dynamics_synthesis.npz", synth)
            synth_rows.to_parquet(tmp / "dynamics_synthesis.parquet", index=False)
        if g.figures:
            figures.erf_heatmaps({k: {n: m for n, (m, _) in per.items()} for k, per in maps.items()}, tmp / "erf_heatmaps.png")
            figures.erf_vs_depth(erf, tmp / "erf_vs_depth.png")
            if len(eq):
                figures.equivariance_by_depth(eq, tmp / "equivariance_by_depth.png")
            figures.shift_survival(inv, tmp / "shift_survival.png")
            if dyn is not None:
                figures.dynamics(dyn, filters, tmp / "dynamics.png", tmp / "dynamics_filters.png")
        agreement = chance_agreement(batched_layer_outputs(model, x, [], bs, device)[0].argmax(1))
        write_json(tmp / "metrics.json", stamped(ctx.run.path, headline(eq, inv, erf, fields, agreement)))
    log.info("%s: geometry of %d layers on %d probe images written", out_dir, len(layers), len(x))
    return out_dir
