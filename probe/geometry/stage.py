"""``probe geometry run=<run dir>``: equivariance, invariance, effective receptive fields and
training dynamics of one run, written to ``<run>/geometry/``."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from probe.analysis import open_run
from probe.capture import resolve_layers
from probe.geometry import figures
from probe.geometry.config import GeometryStage
from probe.geometry.dynamics import dynamics_table, middle_conv, snapshot_images, snapshot_paths
from probe.geometry import equivariance, invariance
from probe.geometry.erf import erf_maps, erf_rms, erf_size
from probe.geometry.fields import LayerField, layer_fields
from probe.geometry.forward import layer_outputs, module_types
from probe.geometry.invariance import Transform, transforms
from probe.rundir import staged_dir, write_json, write_npz

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


def shift_tables(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[str],
                 fields: dict[str, LayerField], ts: list[Transform], batch_size: int,
                 device: torch.device) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The equivariance and invariance tables from one forward pass per transform."""
    out0, base = layer_outputs(model, x, layers, batch_size, device)
    types = module_types(model, layers)
    eq, inv = [], []
    for t in ts:
        out, acts = layer_outputs(model, t.apply(x), layers, batch_size, device)
        if t.kind == "shift":
            eq += equivariance.equivariance_rows(base, acts, layers, fields, types, t.mode, t.axis, int(t.amount),
                                                   x.shape[-2 if t.axis == "y" else -1])
        inv += invariance.invariance_rows(t, out0, base, out, acts, y, layers, types)
    return pd.DataFrame(eq, columns=equivariance.COLUMNS), pd.DataFrame(inv, columns=invariance.COLUMNS)


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


def headline(eq: pd.DataFrame, inv: pd.DataFrame, erf: pd.DataFrame, fields: dict[str, LayerField]) -> dict:
    """Small two-level dict for DVC: equivariance at shift 1 of the first and last conv, prediction
    survival (zero-filled shifts, mean over axes), ERF/TRF of the last conv."""
    out: dict[str, dict] = {"equivariance": {}, "survival": {}, "erf": {}}
    convs = eq[eq["type"] == "Conv2d"].sort_values("depth")["layer"]
    if len(convs):
        for tag, name in (("first_conv", convs.iloc[0]), ("last_conv", deepest_conv(eq, fields))):
            for mode in eq["mode"].unique():
                sel = eq[(eq["layer"] == name) & (eq["shift"] == 1) & (eq["mode"] == mode)]
                if len(sel):
                    out["equivariance"][f"{tag}_shift1_{mode}"] = _finite(sel["error"].mean())
                    out["equivariance"][f"{tag}_shift1_{mode}_interior"] = _finite(sel["error_interior"].mean())
    last = deepest_conv(erf, fields)
    if last is not None:
        sel = erf[erf["layer"] == last]
        for kind, g in sel.groupby("input"):
            out["erf"][f"last_conv_erf_trf_ratio_{kind}"] = _finite(g["erf_trf_ratio"].iloc[0])
            out["erf"][f"last_conv_erf_side_{kind}"] = _finite(g["erf_side"].iloc[0])
        out["erf"]["last_conv_trf"] = _finite(sel["trf"].iloc[0])
    shifts = inv[(inv["layer"] == "output") & (inv["transform"] == "shift")]
    mode = "zero" if (shifts["mode"] == "zero").any() else "circular"
    for n in (1, 2, 4):
        sel = shifts[(shifts["amount"] == n) & (shifts["mode"] == mode)]
        if len(sel):
            out["survival"][f"shift{n}"] = _finite(sel["survival"].mean())
    clean = inv[inv["layer"] == "output"]["accuracy_clean"]
    if len(clean):
        out["survival"]["accuracy_clean"] = _finite(clean.iloc[0])
    out = {k: {name: v for name, v in d.items() if v is not None} for k, d in out.items()}
    return {k: d for k, d in out.items() if d}


def run(cfg: GeometryStage) -> Path:
    """Measure the run's geometry and write ``<run>/geometry/``; return that folder."""
    ctx = open_run(cfg)
    model, device, card = ctx.run.model, ctx.device, ctx.run.card
    layers = call_order(card, resolve_layers(model, cfg.layers))
    x, y = ctx.probe_x, ctx.probe_y
    bs = cfg.data.batch_size
    mean, std = torch.tensor(ctx.data.mean).view(1, -1, 1, 1), torch.tensor(ctx.data.std).view(1, -1, 1, 1)
    fill = (0.0 - mean) / std  # black, normalised
    _, example_outs = layer_outputs(model, x[:1], layers, bs, device)
    fields = layer_fields(model, x[:1].to(device), example_outs)
    types = module_types(model, layers)
    s = cfg.shift
    ts = transforms(s.shifts, s.axes, s.modes, cfg.invariance.rotations, cfg.invariance.scales, fill)
    eq, inv = shift_tables(model, x, y, layers, fields, ts, bs, device)

    inputs = {"probe": x}
    if cfg.erf.noise_images:
        g = torch.Generator().manual_seed(cfg.seed)
        inputs["noise"] = torch.randn((cfg.erf.noise_images, *x.shape[1:]), generator=g)
    maps = {k: erf_maps(model, v, layers, device) for k, v in inputs.items()}
    image_size = int(x.shape[-1])
    erf = erf_table(maps, fields, card, types, layers, cfg.erf.mass, image_size)

    snaps = snapshot_paths(ctx.run.path) if cfg.dynamics else []
    dyn, filters = dynamics_table(model, x, snaps, bs, device) if snaps else (None, {})
    conv = middle_conv(model)
    synth, synth_rows = {}, None
    if snaps and conv is not None and cfg.dynamics_steps and cfg.dynamics_channels:
        width = dict(model.named_modules())[conv].out_channels
        synth, synth_rows = snapshot_images(model, snaps, conv, list(range(min(cfg.dynamics_channels, width))),
                                            int(x.shape[1]), int(x.shape[-1]), ctx.data.mean, ctx.data.std,
                                            cfg.dynamics_steps, device)

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
        if cfg.figures:
            figures.erf_heatmaps({k: {n: m for n, (m, _) in per.items()} for k, per in maps.items()}, tmp / "erf_heatmaps.png")
            figures.erf_vs_depth(erf, tmp / "erf_vs_depth.png")
            if len(eq):
                figures.equivariance_by_depth(eq, tmp / "equivariance_by_depth.png")
            figures.shift_survival(inv, tmp / "shift_survival.png")
            if dyn is not None:
                figures.dynamics(dyn, filters, tmp / "dynamics.png", tmp / "dynamics_filters.png")
        write_json(tmp / "metrics.json", headline(eq, inv, erf, fields))
    log.info("%s: geometry of %d layers on %d probe images written", out_dir, len(layers), len(x))
    return out_dir
