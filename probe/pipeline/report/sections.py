"""The report's sections. Each returns a plain dict of blocks (tables, figures, galleries) that the
template lays out; a section whose artefacts are missing for some runs says which command writes them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from probe.pipeline.report import ranking
from probe.pipeline.report.claims import (MINUS, claim, counts, estimates, fmt_comparison, fmt_estimate, is_comparison,
                                 is_estimate, num, verdict)
from probe.pipeline.report.collect import (RUNTIME_KEYS, SEED_KEYS, RunData, differing_keys, relative_depth, seed_groups,
                                          stage_command)
from probe.pipeline.report.collect import headline as collect_headline
from probe.pipeline.report.figures import figure_uri, grid_uri, heat_overlay, image_uri, minmax, png_uri
from probe.uncertainty import adjust, mean_interval, paired_comparison, proportion_interval, proportions_comparison


def _section(sid: str, title: str, intro: str = "") -> dict:
    return {"id": sid, "title": title, "intro": intro, "blocks": [], "missing": [], "claims": []}


def _table(caption: str, df: pd.DataFrame, digits: int = 4, wrap: tuple[str, ...] = ()) -> dict:
    """A table block; a Comparison or Estimate cell is written by the one formatter of claims.py, and cells do
    not wrap except in the columns named in ``wrap`` (long sentences)."""
    def fmt(v):
        if isinstance(v, dict) and "href" in v:  # a link: the template writes <a href>
            return v
        if is_comparison(v):
            return fmt_comparison(v)
        if is_estimate(v):
            return fmt_estimate(v)
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else num(v, None) if abs(v) < 1e-3 and v != 0 else \
                f"{v:,.{digits}g}".replace("-", MINUS) if abs(v) < 1e4 else f"{v:,.0f}".replace("-", MINUS)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    columns = [str(c) for c in df.columns]
    return {"kind": "table", "caption": caption, "columns": columns,
            "rows": [[fmt(v) for v in row] for row in df.itertuples(index=False)],
            "wrap": [i for i, c in enumerate(columns) if c in wrap]}


def _figure(caption: str, fig) -> dict:
    return {"kind": "figure", "caption": caption, "uri": figure_uri(fig)}


def _rows_of(cells: list[dict], width: int = 8) -> list[list[dict]]:
    """Image cells laid out ``width`` to a row, the last row padded with empty cells."""
    rows = [cells[i:i + width] for i in range(0, len(cells), width)] or [[]]
    rows[-1] += [{"text": ""}] * (width - len(rows[-1]))
    return rows


def _gallery(caption: str, items: list[tuple[str, str]]) -> dict:
    return {"kind": "gallery", "caption": caption, "items": [{"caption": c, "uri": u} for c, u in items]}


def _need(section: dict, runs: list[RunData], stage: str) -> list[RunData]:
    """The runs that have ``stage``'s artefacts; note the others as missing."""
    have = []
    for r in runs:
        if r.has(stage):
            have.append(r)
        else:
            entry = {"run": r.label, "command": stage_command(stage, r.path)}
            if stage in r.stale:
                entry["why"] = r.stale[stage]
            section["missing"].append(entry)
    return have


def with_relative_depth(d: pd.DataFrame) -> pd.DataFrame:
    """``d`` (rows with ``run``, ``layer`` and the stage's call-order ``depth``) with each layer's relative depth
    (:func:`probe.pipeline.report.collect.relative_depth`), shortcut branches dropped: how models are aligned."""
    rel = {run: relative_depth(list(dict.fromkeys(g.sort_values("depth")["layer"]))) for run, g in d.groupby("run", sort=False)}
    d = d.assign(**{"relative depth": [rel[run].get(layer, np.nan) for run, layer in zip(d["run"], d["layer"])]})
    return d.dropna(subset=["relative depth"])


def _depth_frame(runs: list[RunData], stage: str, table: str) -> pd.DataFrame:
    parts = []
    for r in runs:
        df = r.table(stage, table)
        if df is not None:
            parts.append(df.assign(run=r.label))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# 1. overview ---------------------------------------------------------------------------------------

def overview(runs: list[RunData]) -> dict:
    s = _section("overview", "Overview", "Every run on this page, and the configuration keys in which they differ.")
    rows = []
    for r in runs:
        c = r.card
        rows.append({"run": r.label, "model": r.model, "dataset": c["data"]["name"], "seed": c["seed"],
                     "params": c["params_total"], "test accuracy": c["metrics"].get("test_acc"),
                     "epochs": c["metrics"].get("epochs")})
    s["blocks"].append(_table("Runs", pd.DataFrame(rows)))
    keys = differing_keys(runs)
    if keys:
        diff = pd.DataFrame([{"run": r.label, **{k: r.config.get(k) for k in keys}} for r in runs])
        s["blocks"].append(_table("Configuration keys that differ between runs", diff))
    else:
        s["blocks"].append({"kind": "text", "text": "All runs share the same configuration."})
    return s


# 2. architecture -----------------------------------------------------------------------------------

def architecture(runs: list[RunData]) -> dict:
    s = _section("architecture", "Architecture",
                 "Layer tables as in the lecture, with each layer's theoretical receptive field (RF) and its stride "
                 "in input pixels. Runs of the same model share one table.")
    seen: dict[str, list[str]] = {}
    for r in runs:
        seen.setdefault(r.model, []).append(r.label)
    for model, labels in seen.items():
        card = next(r.card for r in runs if r.model == model)
        rows = [{"layer": f"{row['type']}-{i}", "module": row["name"],
                 "output shape": "[-1, " + ", ".join(map(str, row["output_shape"])) + "]",
                 "params": row["params"],
                 "RF": "x".join(map(str, row["receptive_field"])) if row.get("receptive_field") else "",
                 "RF stride": "x".join(map(str, row["rf_stride"])) if row.get("rf_stride") else ""}
                for i, row in enumerate(card["layers"], 1)]
        s["blocks"].append(_table(f"{model} ({', '.join(labels)}): {card['params_total']:,} parameters",
                                  pd.DataFrame(rows)) | {"collapsed": len(rows) > 30})
    return s


# 3. filters ----------------------------------------------------------------------------------------

def filters(runs: list[RunData]) -> dict:
    s = _section("filters", "Filters", "First-layer kernels, each min-max scaled; for one input channel, blue is "
                 "negative and red positive.")
    for r in _need(s, runs, "activations"):
        z = r.arrays("activations", "filters")
        weights = [k for k in z.files if k.endswith("/weight")] if z is not None else []
        if not weights:
            continue
        w = z[weights[0]]  # (out, in, kh, kw)
        layer = weights[0].split("/")[0]
        signed = w.shape[1] != 3
        imgs = w[:64, :1] if signed else minmax(w, axes=(1, 2, 3))[:64]
        cells = [{"uri": image_uri(k, signed=signed), "alt": f"kernel {i}", "size": 48, "note": f"kernel {i}"}
                 for i, k in enumerate(imgs)]
        rows = _rows_of(cells)
        s["blocks"].append({"kind": "images", "caption": f"{r.label}: {layer}, {w.shape[0]} kernels "
                            f"{w.shape[2]}x{w.shape[3]}" + (" (the first 64)" if w.shape[0] > 64 else "")
                            + (" (input channel 0)" if signed and w.shape[1] > 1 else ""),
                            "columns": [], "rows": rows})
    return s


# 4. feature maps -----------------------------------------------------------------------------------

def feature_maps(runs: list[RunData], n_images: int) -> dict:
    s = _section("feature-maps", "Feature maps", "The same probe images through each model: the input, then the "
                 "first channels of the first captured layer (each map min-max scaled).")
    for r in _need(s, runs, "activations"):
        z = r.arrays("activations", "feature_maps")
        layers = [k for k in z.files if not k.startswith("probe_")] if z is not None else []
        if not layers:
            continue
        images = z["probe_images"][:n_images]
        maps = z[layers[0]][:n_images, :7]  # (n, c, h, w)
        n, c, h, w = maps.shape
        ih, iw = images.shape[-2:]
        # resize maps to the image size by nearest neighbour for a tidy grid
        ys = (np.arange(ih) * h // ih)
        xs = (np.arange(iw) * w // iw)
        maps = minmax(maps)[:, :, ys][:, :, :, xs]
        grey_images = images.mean(1, keepdims=True) if images.shape[1] != 1 else images
        names = r.card.get("data", {}).get("classes") or []
        labels = z["probe_labels"][:n_images] if "probe_labels" in z.files else [None] * n
        table = [[{"text": f"class {names[int(y)] if y is not None and int(y) < len(names) else y}"},
                  {"uri": image_uri(grey_images[i]), "alt": "probe image", "size": 64}]
                 + [{"uri": image_uri(maps[i, j][None]), "alt": f"channel {j}", "size": 64} for j in range(c)]
                 for i, y in enumerate(labels)]
        s["blocks"].append({"kind": "images", "caption": f"{r.label}: probe images through {layers[0]} (each map "
                            "min-max scaled, enlarged to the image's size by nearest neighbour)",
                            "columns": ["probe image", "input", *(f"channel {j}" for j in range(c))], "rows": table})
    return s


# 5. activation distributions ------------------------------------------------------------------------

def distributions(runs: list[RunData], colours: dict, n_units: int) -> dict:
    s = _section("distributions", "Activation distributions",
                 "Statistics of every layer and channel over the whole analysed split, streamed in one pass.")
    have = _need(s, runs, "activations")
    if not have:
        return s
    for r in have:
        dc = _dead_counts(r)
        if dc:
            e = proportion_interval(dc[0], dc[1]).to_dict() if dc[1] else None
            s["claims"].append(claim("distributions", r.label, f"dead units in {', '.join(dc[2])}", "fraction", e))
    stats = _depth_frame(have, "activations", "stats")
    if stats.empty:
        return s
    for col in ("dead", "selectivity", "frac_active"):  # nullable columns (NA where undefined) as float with NaN
        if col in stats.columns:
            stats[col] = stats[col].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    depth = {r.label: r.layer_order() for r in have}
    stats["depth"] = [depth[run].get(layer, -1) for run, layer in zip(stats["run"], stats["layer"])]
    covered = {r.label: _covered(r) for r in have}
    per_layer = (stats.groupby(["run", "layer", "depth"], sort=False)
                 .agg(dead=("dead", "mean"), sparsity=("frac_active", lambda a: 1 - a.mean()),
                      selectivity=("selectivity", lambda a: a[(a >= 0) & (a <= 1)].mean())).reset_index()
                 .sort_values(["run", "depth"]))
    rel = {run: relative_depth(list(g.sort_values("depth")["layer"])) for run, g in per_layer.groupby("run", sort=False)}
    per_layer["relative depth"] = [rel[run].get(layer, np.nan) for run, layer in zip(per_layer["run"], per_layer["layer"])]
    # dead units are defined only where the activation is a rectifier's input or output
    keep = [covered[run] is None or layer in covered[run] for run, layer in zip(per_layer["run"], per_layer["layer"])]
    per_layer["dead"] = per_layer["dead"].where(keep)
    stated = {r.label: r.metrics["activations"].get("dead_fraction") for r in have}
    per_layer["dead"] = [stated[run][layer] if isinstance(stated[run], dict) and covered[run] is not None
                         and layer in stated[run] else d
                         for run, layer, d in zip(per_layer["run"], per_layer["layer"], per_layer["dead"])]
    per_layer["dead"] = per_layer["dead"].astype(float)
    said = sorted({f"{run}: {', '.join(c)}" for run, c in covered.items() if c is not None})

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, col, title in zip(axes, ("dead", "sparsity"), ("dead units (never active)", "sparsity (1 - fraction active)")):
        sns.lineplot(per_layer.dropna(subset=[col, "relative depth"]), x="relative depth", y=col, hue="run",
                     palette=colours, marker="o", ax=ax)
        ax.set_title(f"Fraction of {title}")
        ax.set_xlabel("relative depth (0 = first, 1 = last)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylabel(col)
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    s["blocks"].append(_figure("Dead units and sparsity by relative depth, one line per run (shortcut branches left "
                               "out: they are not depth)" + (
        "; dead units only on layers that feed a rectifier or are one (" + "; ".join(said) + ")" if said else ""), fig))

    hist = _depth_frame(have, "activations", "hist")
    if not hist.empty:
        hist = hist[hist["channel"] == -1]
        s["blocks"].append(_figure("Distribution of activations per layer (histogram counts over the population, each "
                                   "ridge scaled to its largest bin; the x axis is symmetric-log scaled, linear within "
                                   "±0.1; at the right, the share of activations exactly 0, not drawn)", _ridge(hist, depth, colours)))

    sel, outside = defined_selectivity(stats)
    if not sel.empty:
        # one panel per architecture (runs with the same layer names share it), layers by name: never by index
        names = {run: tuple(g.sort_values("depth")["layer"].unique()) for run, g in sel.groupby("run", sort=False)}
        models = list(dict.fromkeys(names.values()))
        fig, axes = plt.subplots(1, len(models), figsize=(max(11, 2.2 + sum(0.9 * len(m) for m in models)), 3.8),
                                 squeeze=False, sharey=True, width_ratios=[max(len(m), 2) for m in models])
        for ax, layers in zip(axes[0], models):
            d = sel[sel["run"].isin([run for run, n in names.items() if n == layers])]
            sns.boxplot(d, x="layer", y="selectivity", hue="run", palette=colours, ax=ax, fliersize=1, order=list(layers))
            ax.set_ylim(0, 1)
            ax.set_xlabel("")
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
            ax.legend(fontsize=7, loc="upper left")
        axes[0][0].set_ylabel("class selectivity index")
        fig.suptitle("Class selectivity index of units, per layer")
        fig.tight_layout()
        s["blocks"].append(_figure(
            "Class selectivity (Morcos et al. 2018) of rectified units: (max − mean of the other classes) / (max + mean "
            "of the other classes) of the class-mean activations; 0 = responds equally to every class, 1 = to one class "
            "only. Units where it is undefined are left out" + (f" ({outside} values outside [0, 1], where the "
                                                               "index is undefined, dropped)" if outside else ""), fig))

    medians = {r.label: r.metrics["activations"].get("selectivity_median") for r in have}
    if all(isinstance(m, dict) for m in medians.values()):  # the stage's own summary, where it writes one
        per_layer["selectivity"] = [medians[run].get(layer, np.nan) for run, layer in zip(per_layer["run"], per_layer["layer"])]
        sel_name = "selectivity (median over units)"
    else:
        sel_name = "selectivity (mean over units where defined)"
    table = per_layer.assign(dead=per_layer["dead"].round(4), sparsity=per_layer["sparsity"].round(4))
    table = table.rename(columns={"selectivity": sel_name})
    s["blocks"].append(_table("Per layer (dead units only where the layer has a rectified response; blank: undefined)",
                              table[["run", "layer", "dead", "sparsity", sel_name]]) | {"collapsed": True})

    if n_units:
        items = []
        for r in have:
            z = r.arrays("activations", "exemplar_crops")
            ex = r.table("activations", "exemplars")
            if z is None or ex is None:
                continue
            layers = [k.split("/")[0] for k in z.files if k.endswith("/crops")]
            # the deepest conv whose receptive field is still a part of the image (shortcuts excluded)
            size = r.card["data"]["image_size"]
            rows = {row["name"]: row for row in r.card["layers"]}
            convs = [n for n in layers if rows.get(n, {}).get("type") == "Conv2d" and "shortcut" not in n
                     and "downsample" not in n and (rows[n].get("receptive_field") or [size])[0] < size]
            layer = (convs or layers)[-1] if (convs or layers) else None
            if layer is None:
                continue
            crops = z[f"{layer}/crops"][:n_units]  # (units, k, C, h, w)
            crops = crops / 255.0 if crops.dtype == np.uint8 else crops
            u, k = crops.shape[:2]
            items.append((f"{r.label}: {layer}, units 0-{u - 1} (rows), top {k} dataset crops",
                          grid_uri(crops.reshape(u * k, *crops.shape[2:]), cols=k, scale=3)))
        if items:
            s["blocks"].append(_gallery("Top dataset exemplars, cropped to each unit's receptive field", items))
    return s


def defined_selectivity(stats: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows whose class selectivity index is defined (finite, in the index's range [0, 1]), and how many
    finite values lay outside it."""
    sel = stats[np.isfinite(stats["selectivity"].astype(float))]
    inside = (sel["selectivity"] >= 0) & (sel["selectivity"] <= 1)
    return sel[inside], int((~inside).sum())


def _covered(r: RunData) -> list[str] | None:
    """The layers on which activations/metrics.json defines dead units (None: it does not say)."""
    m = r.metrics.get("activations", {})
    for key in ("dead_fraction_layers", "dead_layers", "covered_layers"):
        if isinstance(m.get(key), list):
            return [str(x) for x in m[key]]
    if isinstance(m.get("dead_units"), dict):
        return list(m["dead_units"])
    return None


def _symlog_ticks(limit: float) -> list[float]:
    """0 and powers of ten (every other one when there are many) out to ``limit``, both signs: at most 7 labels."""
    k = int(np.floor(np.log10(max(limit, 0.1))))
    powers = [10.0 ** e for e in range(0, k + 1)] or [0.1]
    while len(powers) > 3:
        powers = powers[1::2] if len(powers) % 2 == 0 else powers[::2]
    return [-p for p in powers[::-1]] + [0.0] + powers


def _ridge(hist: pd.DataFrame, depth: dict, colours: dict):
    """One ridge per layer: counts of the non-zero histogram bins scaled to the ridge's height, with the share of
    activations exactly 0 (after a ReLU or a max-pool of one, often most of them) written at the right."""
    runs = list(dict.fromkeys(hist["run"]))
    n_layers = max(hist.groupby("run")["layer"].nunique())
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 0.45 * n_layers + 1.5), squeeze=False, sharex=True)
    reach = 0.1
    for ax, run in zip(axes[0], runs):
        h = hist[hist["run"] == run]
        layers = sorted(h["layer"].unique(), key=lambda n: depth[run].get(n, 0))
        for i, layer in enumerate(layers):
            g = h[h["layer"] == layer].sort_values("lo")
            total = float(g["count"].sum())
            zero = (g["lo"] == 0) & (g["hi"] == 0)
            nz = g[~zero]
            centre = np.where(np.isfinite(nz["lo"]) & np.isfinite(nz["hi"]), (nz["lo"] + nz["hi"]) / 2, np.nan)
            keep = np.isfinite(centre)
            dens = nz["count"].to_numpy()[keep].astype(float)
            if (dens > 0).any():
                reach = max(reach, float(np.abs(centre[keep][dens > 0]).max()))
            dens = dens / dens.max() if dens.max() > 0 else dens
            y0 = len(layers) - 1 - i
            ax.fill_between(centre[keep], y0, y0 + 0.9 * dens, color=colours[run], alpha=0.7, lw=0)
            if total > 0 and zero.any() and g.loc[zero, "count"].sum() > 0:
                ax.text(1.01, y0 + 0.3, f"0: {g.loc[zero, 'count'].sum() / total:.0%}",
                        transform=ax.get_yaxis_transform(), fontsize=7, ha="left", va="center", color="#4a5263")
        ax.set_yticks(np.arange(len(layers))[::-1] + 0.3, layers, fontsize=8)
        ax.set_ylim(-0.2, len(layers))
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_title(run, fontsize=10)
        ax.set_xlabel("activation")
    for ax in axes[0]:
        ax.set_xlim(-reach * 1.3, reach * 1.3)
        ax.xaxis.set_major_locator(FixedLocator(_symlog_ticks(reach)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


# 6. saliency ---------------------------------------------------------------------------------------

TARGETS = {"logit": "the logit (pre-softmax score) of the true class",
           "log_softmax": "the log-softmax output of the true class", "probability": "the softmax probability of the true class"}


def saliency_methods(m: dict) -> list[str]:
    """The method entries of a saliency metrics.json (dicts with a deletion AUC), in file order."""
    return [k for k, v in m.items() if isinstance(v, dict) and "deletion_auc" in v]


def _target_sentence(have: list[RunData]) -> str:
    said, unknown, layers = {}, [], []
    for r in have:
        m = r.metrics["saliency"]
        t = m.get("target")
        if t:
            said.setdefault(TARGETS.get(t, f"'{t}'"), []).append(r.label)
        else:
            unknown.append(r.label)
        extra = []
        if m.get("head_bypassed"):
            extra.append(f"the final {m['head_bypassed']} bypassed for attribution")
        if m.get("gradcam_layer"):
            extra.append(f"Grad-CAM on {m['gradcam_layer']}")
        if m.get("random_orders"):
            extra.append(f"{m['random_orders']} random pixel orders")
        if m.get("auc_steps"):
            extra.append(f"{m['auc_steps']} AUC steps")
        if extra:
            layers.append(f"{r.label}: " + ", ".join(extra))
    out = []
    if len(said) == 1 and not unknown:
        out.append(f"Every map attributes {next(iter(said))}.")
    else:
        out += [f"{', '.join(v)}: the maps attribute {k}." for k, v in said.items()]
    if unknown:
        out.append(f"{', '.join(unknown)}: saliency/metrics.json does not record the attribution target (written by an "
                   "older probe; rerun probe saliency).")
    if layers:
        out.append("; ".join(layers) + ".")
    return " ".join(out)


def saliency(runs: list[RunData], colours: dict, n_images: int) -> dict:
    s = _section("saliency", "Saliency")
    have = _need(s, runs, "saliency")
    s["intro"] = ("Attribution maps for the same probe images (rows) in every model. " + (_target_sentence(have) if have else "")
                  + " Faithfulness: deletion / insertion AUC (RISE convention, Petsiuk et al. 2018: the target's "
                  "probability against the fraction of pixels removed or inserted, area normalised to [0, 1]), means "
                  "over the probe images of the true class as in saliency/metrics.json, against the mean over many "
                  "random pixel orders; the difference is paired over images with its 95% interval and its "
                  "Holm-adjusted p. Lower deletion and higher insertion than random mean the map points at evidence "
                  "the model uses; where p ≥ 0.05 the table says 'not distinguishable from random'.")
    if not have:
        return s
    items = []
    for r in have:
        z = r.arrays("saliency", "maps")
        if z is None:
            continue
        methods = [k for k in z.files if k not in ("images", "image", "labels", "targets", "target_kind", "target",
                                                   "predictions", "target_kinds") and z[k].ndim == 3]
        if "target_kind" in z.files:
            rows = np.flatnonzero(z["target_kind"] == "true")[:n_images]
        else:
            rows = np.arange(min(n_images, len(z["images"])))
        images = z["images"][rows]
        images = images if images.max() <= 1.0 and images.min() >= 0 else minmax(images, axes=(1, 2, 3))
        names = r.card.get("data", {}).get("classes") or []
        name = lambda k: str(names[k]) if 0 <= k < len(names) else str(k)  # noqa: E731
        table = []
        for i, row in enumerate(rows):
            true, pred = int(z["labels"][row]), int(z["predictions"][row])
            prob = f", p = {float(z['probabilities'][row]):.3f}" if "probabilities" in z.files else ""
            cells = [{"text": f"true {name(true)}, predicted {name(pred)}{prob}"},
                     {"uri": image_uri(np.repeat(images[i].mean(0, keepdims=True), 3, 0)), "alt": "probe image",
                      "size": 64}]
            cells += [{"uri": image_uri(heat_overlay(images[i:i + 1], z[m][row:row + 1])[0]), "alt": f"{m} map",
                       "size": 64} for m in methods]
            table.append(cells)
        items.append({"kind": "images", "caption": f"{r.label}: the maps of the true class (red: large |attribution|)",
                      "columns": ["probe image", "input", *methods], "rows": table})
    s["blocks"].extend(items)

    rows: dict[str, list] = {}
    road, rnd_rows = [], []
    for r in have:
        m = r.metrics["saliency"]
        for method in saliency_methods(m):
            v = m[method]
            for kind, sign, better in (("deletion", -1, "lower"), ("insertion", 1, "higher")):
                c = v.get(f"{kind}_vs_random")
                words = verdict(c, "beats random", "worse than random", "not distinguishable from random", sign)
                rows.setdefault(kind, []).append({
                    "run": r.label, "method": method, f"{kind} AUC": v.get(f"{kind}_auc"),
                    "random-order AUC": v.get(f"{kind}_auc_random"),
                    "method − random [95% CI], p": fmt_comparison(c) if c else "no test (rerun probe saliency)",
                    "verdict": words})
                s["claims"].append(claim("saliency", r.label, f"{method} {kind} AUC against random pixel orders",
                                         words, c, better=f"{better} than random"))
            if "road_lerf_vs_morf" in v or "road_morf_auc" in v:
                c = v.get("road_lerf_vs_morf")
                words = verdict(c, "most-relevant-first removal hurts more", "least-relevant-first removal hurts more",
                                "MoRF and LeRF not distinguishable")
                road.append({"run": r.label, "method": method, "MoRF AUC": v.get("road_morf_auc"),
                             "LeRF AUC": v.get("road_lerf_auc"), "LeRF − MoRF [95% CI], p": fmt_comparison(c),
                             "ROAD": words})
                s["claims"].append(claim("saliency", r.label, f"{method} ROAD LeRF minus MoRF", words, c))
            e = v.get("emprt_complexity_rise")
            sp = {k: v.get(k) for k in ("spearman_randomised", "spearman_randomised_informative", "ssim_randomised")}
            if e is not None or any(x is not None for x in sp.values()):
                words = verdict(e, "complexity rises", "complexity falls",
                                "not distinguishable") if e is not None else "not run"
                rnd_rows.append({"run": r.label, "method": method, "Spearman": sp["spearman_randomised"],
                                 "Spearman, informative pixels": sp["spearman_randomised_informative"],
                                 "SSIM": sp["ssim_randomised"],
                                 "eMPRT complexity rise [95% CI], p": fmt_comparison(e) if e is not None else "not run",
                                 "eMPRT": words})
                if e is not None:
                    s["claims"].append(claim("saliency", r.label, f"{method} eMPRT complexity rise", words, e))
    for kind, better in (("deletion", "lower"), ("insertion", "higher")):
        if rows.get(kind):
            s["blocks"].append(_table(f"{kind.capitalize()} AUC (mean over the probe images of the true class, as in "
                                      f"saliency/metrics.json) against the mean over random pixel orders; {better} "
                                      "than random is better", pd.DataFrame(rows[kind])))
    if road:
        s["blocks"].append(_table("ROAD (Rong et al. 2022): AUC of the target's probability, removing the most (MoRF) and least (LeRF) "
                                  "relevant pixels first with noisy linear imputation; a faithful map has LeRF > MoRF",
                                  pd.DataFrame(road)))
    if rnd_rows:
        s["blocks"].append(_table("Parameter randomisation: rank correlation and SSIM of each map with the map after "
                                  "randomising every layer (Adebayo et al. 2018; 'informative pixels' leaves out pixels "
                                  "that are zero in every map), and eMPRT (Hedström et al. 2023): the rise in the map's "
                                  "complexity (histogram entropy) when the weights are randomised: a map that depends on the "
                                  "model rises", pd.DataFrame(rnd_rows)))
    for r in have:
        s["blocks"].extend(_ranking_blocks(s, r))

    rnd = _depth_frame(have, "saliency", "randomisation")
    if not rnd.empty:
        if "target_kind" in rnd.columns:
            rnd = rnd[rnd["target_kind"] == "true"]
        methods = list(dict.fromkeys(rnd["method"]))
        fig, axes = plt.subplots(1, len(methods), figsize=(3.3 * len(methods), 3.2), squeeze=False, sharey=True)
        for ax, m in zip(axes[0], methods):
            d = rnd[rnd["method"] == m]
            sns.lineplot(d, x="step", y="spearman", hue="run", palette=colours, marker="o", ax=ax, errorbar=None,
                         legend=ax is axes[0][0])
            ax.set_title(m, fontsize=10)
            ax.set_xlabel("layers randomised (from the top)")
            ax.axhline(0, color="grey", lw=0.8)
        axes[0][0].set_ylabel("Spearman rank correlation with the original map")
        fig.tight_layout()
        s["blocks"].append(_figure("Model-parameter randomisation (Adebayo et al. 2018): mean rank correlation of |map| "
                                   "over the true-class rows as layers are re-initialised from the output down", fig))
    return s


def _ranking_blocks(s: dict, r: RunData) -> list[dict]:
    """Per run: each metric's order of the methods, and the pairs on whose order every metric agrees."""
    table = r.table("saliency", "metrics")
    if table is None or "method" not in table.columns:
        return []
    values = ranking.per_image(table)
    if len(values) < 2:
        return []
    pairs = ranking.rank_pairs(values)
    if not pairs:
        return []
    methods = sorted(set.intersection(*(set(v) for v in values.values())))
    metric_sign = {x.name: x.sign for x in ranking.METRICS}
    ranks = pd.DataFrame({"method": methods})
    for metric, per_method in values.items():
        means = pd.Series({k: float(per_method[k].mean()) for k in methods})
        ranks[f"{metric} rank"] = (-metric_sign[metric] * means).rank(method="min").astype(int).to_numpy()
    blocks = [_table(f"{r.label}: each faithfulness metric's order of the methods by its mean over the probe images "
                     "(1 = most faithful by that metric; an order of means, not a ranking: see below)", ranks)]
    order = ranking.total_order(methods, pairs)
    agreed = [p for p in pairs if p.agreed]
    disagree = [p for p in pairs if {1, -1} <= set(p.directions.values())]
    used = ", ".join(values)
    if order:
        text = f"{r.label}: every metric ({used}) orders every pair of methods the same way, distinguishably: " \
               + " > ".join(order) + "."
    else:
        text = (f"{r.label}: no ranking of all methods — the metrics ({used}) agree, distinguishably, on "
                f"{len(agreed)} of {len(pairs)} pairs" + (": " + "; ".join(
                    f"{p.a if p.agreed == 1 else p.b} > {p.b if p.agreed == 1 else p.a}" for p in agreed) if agreed else "")
                + f". They disagree on {len(disagree)} pair{'s' if len(disagree) != 1 else ''}"
                + (": " + "; ".join(f"{p.a} vs {p.b}" for p in disagree) if disagree else "")
                + "; the other pairs are not distinguishable by at least one metric.")
    blocks.append({"kind": "text", "text": text})
    rows = []
    for p in pairs:
        row = {"method a": p.a, "method b": p.b}
        for metric in values:
            row[f"{metric}: a − b [95% CI], p"] = fmt_comparison(p.tests[metric].to_dict()) if metric in p.tests else "-"
        row["verdict"] = p.verdict
        rows.append(row)
        s["claims"].append(claim("saliency", r.label, f"faithfulness order of {p.a} and {p.b}", p.verdict, None,
                                 tests={k: c.to_dict() for k, c in p.tests.items()}))
    blocks.append(_table(f"{r.label}: pairwise differences of the methods (paired over the probe images, Holm over the "
                         "pairs within each metric); an order is stated only where every metric agrees",
                         pd.DataFrame(rows), wrap=("verdict",)) | {"collapsed": True})
    return blocks


# 7. synthesis --------------------------------------------------------------------------------------

def out_activation(r: RunData) -> list[dict]:
    """Per layer, the fraction of channels whose image out-activates the best dataset image, at the spatial
    mean and at the unit's peak, as Estimates: read from synthesis/metrics.json where it holds them,
    else counted from metrics.parquet with Wilson's interval."""
    m = r.metrics.get("synthesis", {})
    rows: dict[str, dict] = {}
    if isinstance(m.get("channel"), dict):  # {layer: {out_activates_mean, out_activates_peak, margin_mean, ...}}
        for layer, d in m["channel"].items():
            if layer != "all" and isinstance(d, dict):
                rows[layer] = {"layer": layer, **{w: d.get(f"out_activates_{w}") for w in ("mean", "peak")
                                                  if d.get(f"out_activates_{w}")},
                               **{f"margin_{w}": d[f"margin_{w}"] for w in ("mean", "peak") if d.get(f"margin_{w}")},
                               **{f"median_margin_{w}": d[f"median_margin_{w}"] for w in ("mean", "peak")
                                  if d.get(f"median_margin_{w}") is not None}}
        return list(rows.values())
    for path, e in estimates(m):
        if not any("out_activ" in p for p in path) or path[-1] in ("all", "k", "n"):
            continue
        where = "peak" if any("peak" in p for p in path) else "mean"
        rows.setdefault(path[-1], {"layer": path[-1]})[where] = e
    if rows:
        return list(rows.values())
    df = r.table("synthesis", "metrics")
    if df is None or "kind" not in df.columns:
        return []
    ch = df[df["kind"] == "channel"]
    out = []
    for layer, g in ch.groupby("layer", sort=False):
        row = {"layer": str(layer)}
        for where, col in (("mean", "out_activates_mean" if "out_activates_mean" in g else "out_activates"),
                           ("peak", "out_activates_peak")):
            if col in g and g[col].notna().any():
                v = g[col].dropna().astype(bool)
                row[where] = proportion_interval(int(v.sum()), len(v)).to_dict()
        out.append(row)
    return out


def transfer(runs: list[RunData], folder: str | None) -> tuple[pd.DataFrame, dict | None, dict[str, dict]]:
    """Class images judged by other runs (``probe compare``'s ``transfer.parquet`` in ``folder``): a table with a row
    per run that made the images and a column per judge (recognised k of n, mean probability of the class); the
    share recognised over every pair of distinct trained runs (untrained runs neither make nor judge it), with
    Wilson's interval; and each trained maker's own share, as Estimates."""
    path = Path(folder) / "transfer.parquet" if folder else None
    if path is None or not path.is_file():
        return pd.DataFrame(), None, {}
    labels = [r.label for r in runs]
    trained = {r.label for r in runs if not untrained(r)}
    t = pd.read_parquet(path)
    t = t[t["maker"].isin(labels) & t["judge"].isin(labels)]
    rows, per_maker = [], {}
    for maker in [x for x in labels if x in set(t["maker"])]:
        mine = t[t["maker"] == maker]
        row = {"class images of": maker}
        for judge in [x for x in labels if x in set(mine["judge"])]:
            g = mine[mine["judge"] == judge]
            row[f"judged by {judge}"] = f"{int(g['recognised'].sum())} of {len(g)} (p {float(g['probability'].mean()):.2f})"
        rows.append(row)
        if maker in trained:
            rec = mine[mine["judge"].isin(trained)]["recognised"].astype(bool)
            if len(rec):
                per_maker[maker] = proportion_interval(int(rec.sum()), len(rec)).to_dict()
    pooled_rows = t[t["maker"].isin(trained) & t["judge"].isin(trained)]["recognised"].astype(bool)
    pooled = proportion_interval(int(pooled_rows.sum()), len(pooled_rows)).to_dict() if len(pooled_rows) else None
    table = pd.DataFrame(rows)
    cols = ["class images of"] + [f"judged by {x}" for x in labels if f"judged by {x}" in table]
    return (table[cols] if len(table) else table), pooled, per_maker


def synthesis(runs: list[RunData], transferred: tuple | None = None) -> dict:
    """The synthesis page; ``transferred``: :func:`transfer`'s result (from the comparison folder), or None."""
    s = _section("synthesis", "Maximum-response synthesis",
                 "Images optimised to maximise a channel (one per channel, whole layers at once) or a class, and Deep "
                 "Dream. A channel's image out-activates when its activation exceeds that of the best dataset image "
                 "(the unit's top exemplar), compared at the spatial mean of the channel and at its peak position; "
                 "fractions are over the layer's channels with Wilson's 95% interval. The margin is the image's "
                 "activation minus the best dataset image's (a ratio means nothing where that is ≤ 0). An image is "
                 "saturated when more of its values lie within 2% of 0 or 1 than in 99% of the training images (and "
                 "in at least half). Class images are judged by the other trained runs: an image only its own model "
                 "calls a 3 is an adversarial pattern, not what the network thinks a 3 looks like.")
    have = _need(s, runs, "synthesis")
    if not have:
        return s
    rows, items, classes, margin_rows, class_blocks, channel_blocks = [], [], [], [], [], []
    for r in have:
        df = r.table("synthesis", "metrics")
        ch = df[df["kind"] == "channel"] if df is not None else pd.DataFrame()
        for row in out_activation(r):
            layer = row["layer"]
            g = ch[ch["layer"] == layer] if len(ch) else ch
            out = {"run": r.label, "layer": layer}
            margins = {"run": r.label, "layer": layer}
            for where, what in (("mean", "at the spatial mean"), ("peak", "at the peak")):
                e = row.get(where)
                out[f"out-activates ({where}) [95% CI]"] = fmt_estimate(e) if e else "not measured"
                if e:
                    s["claims"].append(claim("synthesis", r.label, f"{layer}: fraction of channels whose image "
                                             f"out-activates the best dataset image {what}", "fraction", e))
            sat = r.metrics["synthesis"].get("channel", {}).get(layer, {}).get("saturated")
            out["saturated [95% CI]"] = fmt_estimate(sat) if is_estimate(sat) else "not measured"
            for where in ("mean", "peak"):
                if f"median_margin_{where}" in row:
                    out[f"median margin ({where})"] = row[f"median_margin_{where}"]
                else:
                    col = "margin_peak" if where == "peak" else "margin"
                    if col in g.columns and g[col].notna().any():
                        out[f"median margin ({where})"] = float(g[col].median())
                if f"margin_{where}" in row:
                    c = row[f"margin_{where}"]
                    words = verdict(c, "images out-activate", "dataset images out-activate", "not distinguishable")
                    margins[f"mean margin ({where}) [95% CI], p"] = fmt_comparison(c)
                    margins[f"verdict ({where})"] = words
                    s["claims"].append(claim("synthesis", r.label, f"{layer}: mean margin over the best dataset image "
                                             f"at the {where}", words, c))
            rows.append(out)
            if len(margins) > 2:
                margin_rows.append(margins)
        cls = df[df["kind"] == "class"] if df is not None else pd.DataFrame()
        predicted = r.metrics["synthesis"].get("class_probability", {}).get("predicted")
        if len(cls) and "probability" in cls and is_estimate(predicted):
            objective = ", ".join(sorted(set(cls["objective_name"].dropna().astype(str)))) if "objective_name" in cls else ""
            target = ("the class log-probability" if "class_log_prob" in objective else
                      "the class logit (before any softmax)" if "class_logit" in objective else "not recorded")
            classes.append({"run": r.label, "class images": len(cls),
                            "optimised for": target + (f" (objective {objective})" if objective else ""),
                            "mean probability": float(cls["probability"].mean()),
                            "min probability": float(cls["probability"].min()),
                            "predicted as their class [95% CI]": fmt_estimate(predicted)})
            s["claims"].append(claim("synthesis", r.label, "class images the model predicts as their class",
                                     "fraction", predicted))
        elif len(cls) and "probability" in cls:
            classes.append({"run": r.label, "class images": len(cls), "mean probability": float(cls["probability"].mean()),
                            "min probability": float(cls["probability"].min()),
                            "predicted as their class": f"{int((cls['predicted'] == cls['class']).sum())} of {len(cls)}"
                            if "predicted" in cls else ""})
        z = r.arrays("synthesis", "images")
        if z is None:
            continue
        acc = df[df["kind"] == "accentuated"] if df is not None else pd.DataFrame()
        if len(acc) and "accentuated" in z.files:
            cells = []
            for layer in acc["layer"].unique()[:3]:
                g = acc[acc["layer"] == layer].head(8)
                cells.append([{"text": f"{layer}: exemplar"}] + [
                    {"uri": image_uri(z["accentuated_source"][int(i)]), "alt": f"top exemplar of channel {c}", "size": 48,
                     "note": f"channel {c}"} for i, c in zip(g["image"], g["channel"])])
                cells.append([{"text": f"{layer}: accentuated"}] + [
                    {"uri": image_uri(z["accentuated"][int(i)]), "alt": f"accentuated exemplar of channel {c}", "size": 48,
                     "note": f"Δ {num(float(a - d))}"} for i, c, a, d in zip(g["image"], g["channel"], g["activation"],
                                                                         g["dataset_activation"])])
            channel_blocks.append({"kind": "images", "caption": f"{r.label}: feature accentuation (Hamblin et al. 2024): "
                                   "each channel's top exemplar, optimised for the channel while kept close to the "
                                   "exemplar; below each, the gain in the channel's mean activation",
                                   "columns": [], "rows": cells})
        for layer in ch["layer"].unique() if len(ch) else []:
            g = ch[ch["layer"] == layer].head(32)
            cells = [{"uri": image_uri(z["channel"][int(i)]), "alt": f"channel {c}", "size": 56, "note": f"channel {c}"}
                     for i, c in zip(g["image"], g["channel"])]
            channel_blocks.append({"kind": "images", "caption": f"{r.label}: {layer}, a synthetic image per channel"
                                   + (" (the first 32; every channel is on the layer's atlas page)" if len(ch[ch["layer"] == layer]) > 32 else ""),
                                   "columns": [], "rows": _rows_of(cells)})
        if "class" in z.files and len(z["class"]):
            names = r.card.get("data", {}).get("classes") or []
            cells, heads = [], []
            for i, img in enumerate(z["class"]):
                row = cls[cls["image"] == i] if len(cls) and "image" in cls else cls.iloc[0:0]
                k = int(row["class"].iloc[0]) if len(row) else i
                heads.append(str(names[k]) if k < len(names) else str(k))
                note = (f"p = {float(row['probability'].iloc[0]):.3f}" if len(row) else "") + (
                    f", predicted {names[int(row['predicted'].iloc[0])] if int(row['predicted'].iloc[0]) < len(names) else int(row['predicted'].iloc[0])}"
                    if len(row) and "predicted" in row and pd.notna(row["predicted"].iloc[0]) else "")
                cells.append({"uri": image_uri(img), "alt": f"class image {heads[-1]}", "size": 64, "note": note})
            class_blocks.append({"kind": "images", "caption": f"{r.label}: class images (column: the class each image was "
                                 "optimised for; below: the model's softmax probability of it, and its prediction)",
                                 "columns": heads, "rows": [cells]})
        if "dream" in z.files and len(z["dream"]):
            strip = np.concatenate([z["dream_source"], z["dream"], z["zoom"]] if "zoom" in z.files else
                                   [z["dream_source"], z["dream"]])
            items.append((f"{r.label}: Deep Dream (sources, dreams, zoom frames)", grid_uri(strip, cols=len(z["dream"]), scale=2)))
    if rows:
        s["blocks"].append(_table("Per layer: fraction of channels whose image out-activates the best dataset image",
                                  pd.DataFrame(rows)))
    if margin_rows:
        s["blocks"].append(_table("Per layer: mean margin (image activation minus the best dataset image's) over the "
                                  "channels, paired, with its 95% t interval and sign-flip p", pd.DataFrame(margin_rows)))
    if classes:
        s["blocks"].append(_table("Class images: softmax probability of the class each image was optimised for",
                                  pd.DataFrame(classes)))
    table, pooled, per_maker = transferred or (pd.DataFrame(), None, {})
    if len(table):
        s["blocks"].append(_table("Class images judged by the other runs: how many each run predicts as the class the "
                                  "image was made for, and its mean probability of that class", table))
    if pooled:
        s["blocks"].append({"kind": "text", "text": f"Over every pair of distinct trained runs, {_kn_text(pooled)} class "
                            f"images are recognised by the other run: {fmt_estimate(pooled)} (from the comparison's transfer.parquet)."})
        s["claims"].append(claim("synthesis", "all", "class images recognised by the other trained runs", "fraction", pooled))
    s["blocks"].extend(class_blocks + channel_blocks)
    if items:
        s["blocks"].append(_gallery("Deep Dream", items))
    return s


def _kn_text(e: dict) -> str:
    kn = counts(e)
    return f"{kn[0]} of {kn[1]}" if kn else "?"


def survival_parts(r: RunData) -> list[tuple[int, str, str, dict]]:
    """geometry/metrics.json's shift survival Estimates as (pixels, axis, mode, Estimate), from the keys
    ``survival.shift{n}_{axis}_{mode}`` (the clean accuracy beside them is no shift and is left out)."""
    out = []
    surv = r.metrics.get("geometry", {}).get("survival", {})
    for key, e in surv.items() if isinstance(surv, dict) else []:
        m = re.fullmatch(r"shift(-?\d+)_([a-z]+)_([a-z]+)", key)
        if m and is_estimate(e):
            out.append((int(m[1]), m[2], m[3], e))
    return out


MODES = {"zero": "zero fill", "circular": "circular wrap"}


def survival_estimates(r: RunData) -> dict[str, dict]:
    """The same, keyed by a readable shift ("1 px along x, zero fill")."""
    return {f"{n} px along {axis}, {MODES.get(mode, mode)}": e for n, axis, mode, e in survival_parts(r)}


# 8. geometry ---------------------------------------------------------------------------------------

def geometry(runs: list[RunData], colours: dict) -> dict:
    s = _section("geometry", "Equivariance, invariance and receptive fields",
                 "Does each trained network have the properties the lecture attributes to CNNs?")
    have = _need(s, runs, "geometry")
    if not have:
        return s
    eq = _depth_frame(have, "geometry", "equivariance")
    if not eq.empty:
        if "measurable" in eq.columns:  # a map too small for the shift has no error: never drawn
            eq = eq[eq["measurable"].astype(bool)]
        d = eq[(eq["mode"] == "circular") & (eq["shift"] == eq["shift"].min())]
        d = d.groupby(["run", "depth", "layer"], sort=False)["error_interior"].mean().reset_index()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        sns.lineplot(with_relative_depth(d), x="relative depth", y="error_interior", hue="run", palette=colours,
                     marker="o", ax=ax)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("relative depth (main-path layers, 0 = first, 1 = last)")
        ax.set_title(f"Translation equivariance error by depth (circular shift of {eq['shift'].min()} px)")
        ax.set_ylabel("||f(Tx) - T'f(x)|| / ||f(x)||")
        s["blocks"].append(_figure("Equivariance error by depth (0 = perfectly equivariant)", fig))
    inv = _depth_frame(have, "geometry", "invariance")
    if not inv.empty:
        d = inv[(inv["transform"] == "shift") & (inv["layer"] == "output")]
        d = d.groupby(["run", "amount", "mode"], sort=False)["survival"].mean().reset_index()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        sns.lineplot(d, x="amount", y="survival", hue="run", style="mode", palette=colours, marker="o", ax=ax)
        ax.set_title("Fraction of predictions unchanged by a shift")
        ax.set_xlabel("shift (pixels)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        s["blocks"].append(_figure("Shift robustness of predictions", fig))
    rows = []
    for r in have:
        parts = survival_parts(r)
        by_shift: dict[int, dict] = {}
        for n, axis, mode, e in parts:
            kn = counts(e)
            row = by_shift.setdefault(n, {"run": r.label, "shift (px)": n})
            row[f"along {axis}, {MODES.get(mode, mode)}"] = (f"{kn[0]} of {kn[1]}: " if kn else "") + fmt_estimate(e)
            s["claims"].append(claim("geometry", r.label, f"predictions that survive a shift of {n} px along {axis}, "
                                     f"{MODES.get(mode, mode)}", "fraction", e))
        rows += [by_shift[n] for n in sorted(by_shift)]
        if not parts:
            plain = {k: v for k, v in r.metrics["geometry"].get("survival", {}).items() if k.startswith("shift")}
            for k, v in plain.items():
                if isinstance(v, (int, float)):
                    rows.append({"run": r.label, "shift (px)": k,
                                 "fraction surviving": f"{num(v)} (no interval: rerun probe geometry)"})
    if rows:
        s["blocks"].append(_table("Predictions unchanged by a shift of the input: k of n probe images, with Wilson's 95% "
                                  "interval (the axes and modes use the same images: they are not independent)",
                                  pd.DataFrame(rows)))
    erf = _depth_frame(have, "geometry", "erf")
    if not erf.empty:
        d = erf[erf["input"] == erf["input"].iloc[0]]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        d = with_relative_depth(d)
        sns.lineplot(d, x="relative depth", y="erf_side", hue="run", palette=colours, marker="o", ax=ax)
        sns.lineplot(d, x="relative depth", y="trf_in_image", hue="run", palette=colours, ax=ax, linestyle="--", legend=False)
        ax.set_xlim(-0.03, 1.03)
        ax.set_title("Effective (solid, 95% of gradient mass) vs theoretical (dashed) receptive field")
        ax.set_ylabel("side (pixels)")
        ax.set_xlabel("relative depth (main-path layers, 0 = first, 1 = last)")
        s["blocks"].append(_figure("Effective vs theoretical receptive field by depth", fig))
    items = []
    for r in have:  # training dynamics, for runs trained with train.snapshot_epochs
        for name, what in (("dynamics.png", "dead fraction and sparsity"), ("dynamics_filters.png", "first-layer filters")):
            png = r.file("geometry", name)
            if png is not None:
                items.append((f"{r.label}: {what} per snapshot", png_uri(png.read_bytes())))
        z = r.arrays("geometry", "dynamics_synthesis")
        if z is not None and z.files:
            epochs = sorted(z.files)
            strip = np.concatenate([z[e] for e in epochs])
            items.append((f"{r.label}: synthetic images of the same channels at epochs "
                          + ", ".join(str(int(e.split("_")[1])) for e in epochs) + " (rows)",
                          grid_uri(strip, cols=len(z[epochs[0]]), scale=3)))
    if items:
        s["blocks"].append(_gallery("How features emerge during training", items))
    return s


# 9. trained against random initialisation -------------------------------------------------------------

def epochs(r: RunData):
    return r.card.get("train", {}).get("epochs", r.card.get("metrics", {}).get("epochs"))


def untrained(r: RunData) -> bool:
    return epochs(r) == 0 or r.label == f"{r.model}_random" or r.path.name == f"{r.model}_random"


def baseline_pairs(runs: list[RunData]) -> list[tuple[RunData, RunData]]:
    """(trained, untrained) pairs on the page: the same model and dataset, one trained for 0 epochs (or named
    ``<model>_random``); a trained run is paired with the untrained run of its own seed where there is one."""
    out = []
    for t in runs:
        if untrained(t):
            continue
        cands = [r for r in runs if untrained(r) and r.model == t.model and r.card["data"]["name"] == t.card["data"]["name"]]
        if cands:
            same_seed = [r for r in cands if r.card.get("seed") == t.card.get("seed")]
            out.append((t, (same_seed or cands)[0]))
    return out


def _dead_counts(r: RunData) -> tuple[int, int, list[str]] | None:
    """(dead units, units, covered layers) from activations/metrics.json."""
    m = r.metrics.get("activations", {})
    dead = m.get("dead_units")
    if isinstance(dead, dict) and dead and all(isinstance(v, dict) and "dead" in v and "units" in v for v in dead.values()):
        layers = list(dead)
        return int(sum(dead[k]["dead"] for k in layers)), int(sum(dead[k]["units"] for k in layers)), layers
    return None


def baseline(runs: list[RunData]) -> dict | None:
    pairs = baseline_pairs(runs)
    if not pairs:
        return None
    s = _section("baseline", "Trained against random initialisation",
                 "What training changed, each difference with its 95% interval and p: dead units (a proportion of the "
                 "units of the rectified layers, Newcombe's interval and Fisher's exact test), sparsity (paired over "
                 "layers), each saliency method's advantage over random pixel orders (paired over the same probe "
                 "images), the fraction of channels whose synthetic image out-activates the best dataset image and the "
                 "fraction of predictions surviving a shift (proportions). p is Holm-adjusted within each stage's family "
                 "of tests of the pair.")
    for t, u in pairs:
        tests: list[tuple[str, str, str, object]] = []  # (family, measure, detail, Comparison)
        dt, du = _dead_counts(t), _dead_counts(u)
        if dt and du:
            tests.append(("activations", "dead units", f"{dt[0]} of {dt[1]} vs {du[0]} of {du[1]} units in {', '.join(dt[2])}",
                          proportions_comparison(dt[0], dt[1], du[0], du[1])))
        key = "sparsity_rectified" if t.metrics.get("activations", {}).get("sparsity_rectified") else "sparsity"
        st, su = t.metrics.get("activations", {}).get(key), u.metrics.get("activations", {}).get(key)
        if isinstance(st, dict) and isinstance(su, dict):
            common = [k for k in st if k in su and st[k] is not None and su[k] is not None]
            if len(common) >= 2:
                what = "of the rectified response" if key == "sparsity_rectified" else "of the layer outputs"
                tests.append(("activations", f"sparsity {what}", f"paired over {len(common)} layers ({', '.join(common)})",
                              paired_comparison([st[k] for k in common], [su[k] for k in common])))
        mt, mu = t.table("saliency", "metrics"), u.table("saliency", "metrics")
        if mt is not None and mu is not None:
            for kind in ("deletion", "insertion"):
                col, rcol = f"{kind}_auc", f"{kind}_auc_random"
                if not all(c in d for d in (mt, mu) for c in (col, rcol, "target_kind", "image", "method")):
                    continue
                a = mt[mt["target_kind"] == "true"].assign(e=lambda d: d[col] - d[rcol])
                b = mu[mu["target_kind"] == "true"].assign(e=lambda d: d[col] - d[rcol])
                for method in sorted(set(a["method"]) & set(b["method"])):
                    x = a[a["method"] == method].set_index("image")["e"]
                    y = b[b["method"] == method].set_index("image")["e"]
                    common = x.index.intersection(y.index)
                    if len(common) >= 2:
                        tests.append(("saliency", f"{method}: {kind} AUC − random orders", f"paired over {len(common)} probe images",
                                      paired_comparison(x.loc[common].to_numpy(), y.loc[common].to_numpy())))
        ot = {row["layer"]: row for row in out_activation(t)} if t.has("synthesis") else {}
        ou = {row["layer"]: row for row in out_activation(u)} if u.has("synthesis") else {}
        for layer in [k for k in ot if k in ou]:
            for where in ("mean", "peak"):
                ct, cu = counts(ot[layer].get(where) or {}), counts(ou[layer].get(where) or {})
                if ct and cu:
                    tests.append(("synthesis", f"{layer}: channels out-activating the best image ({where})",
                                  f"{ct[0]} of {ct[1]} vs {cu[0]} of {cu[1]}", proportions_comparison(*ct, *cu)))
        gt, gu = survival_estimates(t), survival_estimates(u)
        for key in [k for k in gt if k in gu]:
            ct, cu = counts(gt[key]), counts(gu[key])
            if ct and cu:
                tests.append(("geometry", f"predictions surviving a shift of {key}", f"{ct[0]} of {ct[1]} vs {cu[0]} of {cu[1]}",
                              proportions_comparison(*ct, *cu)))
        if not tests:
            s["blocks"].append({"kind": "text", "text": f"{t.label} against {u.label}: no measure both runs have."})
            continue
        adjusted: list = [None] * len(tests)
        for family in dict.fromkeys(f for f, _, _, _ in tests):  # Holm within each stage's family of tests
            idx = [i for i, x in enumerate(tests) if x[0] == family]
            for i, c in zip(idx, adjust([tests[i][3] for i in idx])):
                adjusted[i] = c
        rows = []
        for (family, measure, detail, _), c in zip(tests, adjusted):
            d = c.to_dict()
            words = verdict(d, "trained differs from random", "trained differs from random", "not distinguishable")
            rows.append({"stage": family, "measure": measure, "counts / pairing": detail,
                         f"{t.label} − {u.label} [95% CI], p": fmt_comparison(d), "verdict": words})
            s["claims"].append(claim("baseline", t.label, f"{measure}: {t.label} against {u.label}", words, d,
                                     family=family))
        s["blocks"].append(_table(f"{t.label} (trained, {epochs(t)} epochs) against {u.label} (untrained)",
                                  pd.DataFrame(rows), wrap=("measure", "counts / pairing")))
    return s


# 10. sweeps ----------------------------------------------------------------------------------------

headline = collect_headline


def _group_label(members: list[RunData], between: list[str]) -> str:
    r = members[0]
    parts = [r.model, r.card["data"]["name"], f"{epochs(r)} epochs"]
    parts += [f"{k}={r.config.get(k)}" for k in between]
    return ", ".join(parts)


def sweeps(runs: list[RunData], colours: dict) -> dict | None:
    """Runs that share their whole resolved config but the seed, aggregated: every headline number of every
    stage with mean, std, n and Student's 95% t interval of the mean."""
    groups = [g for g in seed_groups(runs) if len(g) > 1]
    if not groups:
        return None
    s = _section("sweeps", "Sweeps",
                 "Runs whose resolved configuration is the same but for the seed (and where or how they ran: device, "
                 "data folder, workers) are repeats of one experiment and are aggregated here; runs with a different "
                 "model, dataset, number of epochs or any other key are never aggregated together. Each number is "
                 "the mean over the runs with its standard deviation, n and the 95% t interval of the mean.")
    s["aggregates"] = []
    ignore = {"model.name", "data.name", "train.epochs"}
    between = [k for k in differing_keys([g[0] for g in groups]) if k not in ignore and k not in SEED_KEYS
               and k not in RUNTIME_KEYS] if len(groups) > 1 else []
    summary, rows, points = [], [], []
    for members in groups:
        label = _group_label(members, between)
        nums = pd.DataFrame([headline(r) for r in members])
        within = [k for k in differing_keys(members) if k not in RUNTIME_KEYS]
        summary.append({"experiment": label, "n": len(members), "runs": ", ".join(r.label for r in members),
                        "varied": ", ".join(within) or "-",
                        "test accuracy": _agg(nums.get("train.test_acc"))["interval"]})
        for col in nums.columns:
            a = _agg(nums[col])
            if a["n"]:
                rows.append({"experiment": label, "metric": col, **{k: v for k, v in a.items() if k != "estimate"}})
                s["aggregates"].append({"experiment": label, "runs": [r.label for r in members], "metric": col,
                                        "mean": a["mean"], "std": a["std"], "n": a["n"], "interval": a["estimate"]})
        for r in members:
            points.append({"experiment": label, "run": r.label, "test accuracy": r.card["metrics"].get("test_acc")})
    s["blocks"].append(_table("Experiments repeated over seeds", pd.DataFrame(summary)))
    s["blocks"].append(_table("Every headline number of every stage, aggregated over the seeds of each experiment",
                              pd.DataFrame(rows)) | {"collapsed": len(rows) > 40})
    pts = pd.DataFrame(points).dropna()
    if not pts.empty:
        labels = list(dict.fromkeys(pts["experiment"]))
        fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(labels)), 3.4))
        sns.stripplot(pts, x="experiment", y="test accuracy", order=labels, ax=ax, size=7, jitter=0.1)
        for i, label in enumerate(labels):
            e = mean_interval(pts.loc[pts["experiment"] == label, "test accuracy"].to_numpy(float))
            ax.plot([i - 0.25, i + 0.25], [e.value, e.value], color="black", lw=2)
            if np.isfinite(e.low):
                ax.errorbar([i], [e.value], yerr=[[e.value - e.low], [e.high - e.value]], color="black", capsize=6, lw=1)
        ax.set_title("Test accuracy of every run (dots), the mean (bar) and its 95% t interval")
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=8)
        s["blocks"].append(_figure("Spread over the seeds of each experiment", fig))
    return s


def _agg(values) -> dict:
    """mean, std, n and the 95% t interval of the finite values."""
    v = pd.Series([] if values is None else values, dtype=float).dropna()
    v = v[np.isfinite(v)]
    if v.empty:
        return {"mean": None, "std": None, "n": 0, "interval": "no values", "estimate": None}
    e = mean_interval(v.to_numpy())
    return {"mean": e.value, "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v),
            "interval": fmt_estimate(e.to_dict()), "estimate": e.to_dict()}
