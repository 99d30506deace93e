"""The report's sections. Each returns a plain dict of blocks (tables, figures, galleries) that the
template lays out; a section whose artefacts are missing for some runs says which command writes them.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from probe.report.collect import STAGE_COMMANDS, RunData, differing_keys
from probe.report.figures import figure_uri, grid_uri, heat_overlay, minmax, png_uri


def _section(sid: str, title: str, intro: str = "") -> dict:
    return {"id": sid, "title": title, "intro": intro, "blocks": [], "missing": []}


def _table(caption: str, df: pd.DataFrame, digits: int = 4) -> dict:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else f"{v:,.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    return {"kind": "table", "caption": caption, "columns": [str(c) for c in df.columns],
            "rows": [[fmt(v) for v in row] for row in df.itertuples(index=False)]}


def _figure(caption: str, fig) -> dict:
    return {"kind": "figure", "caption": caption, "uri": figure_uri(fig)}


def _gallery(caption: str, items: list[tuple[str, str]]) -> dict:
    return {"kind": "gallery", "caption": caption, "items": [{"caption": c, "uri": u} for c, u in items]}


def _need(section: dict, runs: list[RunData], stage: str) -> list[RunData]:
    """The runs that have ``stage``'s artefacts; note the others as missing."""
    have = []
    for r in runs:
        if r.has(stage):
            have.append(r)
        else:
            section["missing"].append({"run": r.label, "command": STAGE_COMMANDS[stage].format(run=r.path)})
    return have


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
                     "epochs": c["metrics"].get("epochs"), "git commit": (c.get("git_commit") or "")[:10]})
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
    items = []
    for r in _need(s, runs, "activations"):
        z = r.arrays("activations", "filters")
        weights = [k for k in z.files if k.endswith("/weight")]
        if not weights:
            continue
        w = z[weights[0]]  # (out, in, kh, kw)
        layer = weights[0].split("/")[0]
        if w.shape[1] == 3:
            img = minmax(w, axes=(1, 2, 3))
            uri = grid_uri(img[:64], cols=8, scale=10)
        else:
            uri = grid_uri(w[:64, :1], cols=8, scale=10, signed=True)
        items.append((f"{r.label}: {layer}, {w.shape[0]} kernels {w.shape[2]}x{w.shape[3]}", uri))
    if items:
        s["blocks"].append(_gallery("First convolutional layer", items))
    return s


# 4. feature maps -----------------------------------------------------------------------------------

def feature_maps(runs: list[RunData], n_images: int) -> dict:
    s = _section("feature-maps", "Feature maps", "The same probe images through each model: the input, then the "
                 "first channels of the first captured layer (each map min-max scaled).")
    items = []
    for r in _need(s, runs, "activations"):
        z = r.arrays("activations", "feature_maps")
        layers = [k for k in z.files if not k.startswith("probe_")]
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
        rows = np.concatenate([grey_images[:, None], maps[:, :, None]], axis=1)  # (n, 1 + c, 1, H, W)
        items.append((f"{r.label}: input + {layers[0]} channels 0-{c - 1}",
                      grid_uri(rows.reshape(-1, 1, ih, iw), cols=c + 1, scale=2)))
    if items:
        s["blocks"].append(_gallery("Probe images (rows) through each model", items))
    return s


# 5. activation distributions ------------------------------------------------------------------------

def distributions(runs: list[RunData], colours: dict, n_units: int) -> dict:
    s = _section("distributions", "Activation distributions",
                 "Statistics of every layer and channel over the whole analysed split, streamed in one pass.")
    have = _need(s, runs, "activations")
    if not have:
        return s
    stats = _depth_frame(have, "activations", "stats")
    depth = {r.label: r.layer_order() for r in have}
    stats["depth"] = [depth[run].get(layer, -1) for run, layer in zip(stats["run"], stats["layer"])]
    per_layer = (stats.groupby(["run", "layer", "depth"], sort=False)
                 .agg(dead=("dead", "mean"), sparsity=("frac_active", lambda a: 1 - a.mean()),
                      selectivity=("selectivity", "mean")).reset_index().sort_values(["run", "depth"]))
    per_layer["layer index"] = per_layer.groupby("run").cumcount()

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, col, title in zip(axes, ("dead", "sparsity"), ("dead units (never active)", "sparsity (1 - fraction active)")):
        sns.lineplot(per_layer, x="layer index", y=col, hue="run", palette=colours, marker="o", ax=ax)
        ax.set_title(f"Fraction of {title} by depth")
        ax.set_xlabel("captured layer (0 = first)")
        ax.set_ylabel(col)
    s["blocks"].append(_figure("Dead units and sparsity by depth, one line per run", fig))

    hist = _depth_frame(have, "activations", "hist")
    if not hist.empty:
        hist = hist[hist["channel"] == -1]
        s["blocks"].append(_figure("Distribution of activations per layer (histogram densities over the population; "
                                   "the x axis is symmetric-log scaled)", _ridge(hist, depth, colours)))

    sel = stats.dropna(subset=["selectivity"])
    if not sel.empty:
        sel = sel.assign(**{"layer index": sel.groupby("run")["depth"].rank(method="dense").astype(int) - 1})
        fig, ax = plt.subplots(figsize=(11, 3.6))
        sns.boxplot(sel, x="layer index", y="selectivity", hue="run", palette=colours, ax=ax, fliersize=1)
        ax.set_title("Class selectivity index of units, by depth")
        s["blocks"].append(_figure("Class selectivity (Morcos et al. 2018): 0 = responds equally to every class", fig))

    table = per_layer.assign(dead=per_layer["dead"].round(4), sparsity=per_layer["sparsity"].round(4))
    s["blocks"].append(_table("Per layer", table[["run", "layer", "dead", "sparsity", "selectivity"]]) | {"collapsed": True})

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


def _ridge(hist: pd.DataFrame, depth: dict, colours: dict):
    runs = list(dict.fromkeys(hist["run"]))
    n_layers = max(hist.groupby("run")["layer"].nunique())
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 0.45 * n_layers + 1.5), squeeze=False, sharex=True)
    for ax, run in zip(axes[0], runs):
        h = hist[hist["run"] == run]
        layers = sorted(h["layer"].unique(), key=lambda n: depth[run].get(n, 0))
        for i, layer in enumerate(layers):
            g = h[h["layer"] == layer].sort_values("lo")
            centre = np.where(np.isfinite(g["lo"]) & np.isfinite(g["hi"]), (g["lo"] + g["hi"]) / 2, np.nan)
            keep = np.isfinite(centre)
            dens = g["count"].to_numpy()[keep].astype(float)
            dens = dens / dens.max() if dens.max() > 0 else dens
            y0 = len(layers) - 1 - i
            ax.fill_between(centre[keep], y0, y0 + 0.9 * dens, color=colours[run], alpha=0.7, lw=0)
        ax.set_yticks(np.arange(len(layers))[::-1] + 0.3, layers, fontsize=8)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_title(run, fontsize=10)
        ax.set_xlabel("activation")
    fig.tight_layout()
    return fig


# 6. saliency ---------------------------------------------------------------------------------------

def saliency(runs: list[RunData], colours: dict, n_images: int) -> dict:
    s = _section("saliency", "Saliency",
                 "Attribution maps of the true class for the same probe images (rows) in every model; faithfulness by "
                 "deletion / insertion AUC against a random pixel order (lower deletion and higher insertion than "
                 "random mean the map points at evidence the model uses), and the cascading randomisation check "
                 "(a map that survives randomised weights explains the image, not the model).")
    have = _need(s, runs, "saliency")
    if not have:
        return s
    items = []
    for r in have:
        z = r.arrays("saliency", "maps")
        methods = [k for k in z.files if k not in ("images", "image", "labels", "targets", "target_kind", "target",
                                                   "predictions", "target_kinds") and z[k].ndim == 3]
        if "target_kind" in z.files:
            rows = np.flatnonzero(z["target_kind"] == "true")[:n_images]
        else:
            rows = np.arange(min(n_images, len(z["images"])))
        images = z["images"][rows]
        images = images if images.max() <= 1.0 and images.min() >= 0 else minmax(images, axes=(1, 2, 3))
        tiles = [np.repeat(images.mean(1, keepdims=True), 3, 1)]
        for m in methods:
            tiles.append(heat_overlay(images, z[m][rows]))
        grid = np.stack(tiles, 1)  # (n, 1 + methods, 3, H, W)
        items.append((f"{r.label}: image, " + ", ".join(methods),
                      grid_uri(grid.reshape(-1, *grid.shape[2:]), cols=len(tiles), scale=2)))
    s["blocks"].append(_gallery("Maps (columns: the image, then each method)", items))

    metrics = _depth_frame(have, "saliency", "metrics")
    if not metrics.empty:
        agg = (metrics.groupby(["run", "method"], sort=False)
               [["deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random"]].mean().reset_index())
        agg["beats random (deletion)"] = agg["deletion_auc"] < agg["deletion_auc_random"]
        agg["beats random (insertion)"] = agg["insertion_auc"] > agg["insertion_auc_random"]
        s["blocks"].append(_table("Deletion and insertion AUC (means over probe images) against the random order", agg))
    rnd = _depth_frame(have, "saliency", "randomisation")
    if not rnd.empty:
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
        s["blocks"].append(_figure("Model-parameter randomisation (Adebayo et al. 2018): rank correlation of |map| "
                                   "as layers are re-initialised from the output down", fig))
    return s


# 7. synthesis --------------------------------------------------------------------------------------

def synthesis(runs: list[RunData]) -> dict:
    s = _section("synthesis", "Maximum-response synthesis",
                 "Images optimised to maximise a channel (one per channel, whole layers at once) or a class, and Deep "
                 "Dream. The ratio compares the activation an image reaches with that of the best dataset image.")
    have = _need(s, runs, "synthesis")
    if not have:
        return s
    rows, items = [], []
    for r in have:
        df = r.table("synthesis", "metrics")
        ch = df[df["kind"] == "channel"]
        for layer, g in ch.groupby("layer", sort=False):
            rows.append({"run": r.label, "layer": layer, "channels": len(g),
                         "out-activate best image": float(g["out_activates"].mean()),
                         "median ratio": float(g["ratio"].median())})
        cls = df[df["kind"] == "class"]
        if len(cls):
            rows.append({"run": r.label, "layer": "classes", "channels": len(cls),
                         "out-activate best image": np.nan, "median ratio": np.nan,
                         "mean class probability": float(cls["probability"].mean()),
                         "min class probability": float(cls["probability"].min())})
        z = r.arrays("synthesis", "images")
        for layer in ch["layer"].unique():
            idx = ch.index[ch["layer"] == layer].to_numpy()
            imgs = z["channel"][ch.loc[idx, "image"].to_numpy()][:32]
            items.append((f"{r.label}: {layer}", grid_uri(imgs, cols=8, scale=2)))
        if "class" in z.files and len(z["class"]):
            probs = ", ".join(f"{p:.3f}" for p in cls["probability"]) if len(cls) else ""
            items.append((f"{r.label}: class images (p = {probs})", grid_uri(z["class"], cols=len(z["class"]), scale=2)))
        if "dream" in z.files and len(z["dream"]):
            strip = np.concatenate([z["dream_source"], z["dream"], z["zoom"]] if "zoom" in z.files else
                                   [z["dream_source"], z["dream"]])
            items.append((f"{r.label}: Deep Dream (sources, dreams, zoom frames)", grid_uri(strip, cols=len(z["dream"]), scale=2)))
    s["blocks"].append(_table("Per layer: fraction of channels whose image out-activates the best dataset image",
                              pd.DataFrame(rows)))
    s["blocks"].append(_gallery("Synthetic images", items))
    return s


# 8. geometry ---------------------------------------------------------------------------------------

def geometry(runs: list[RunData], colours: dict) -> dict:
    s = _section("geometry", "Equivariance, invariance and receptive fields",
                 "Does each trained network have the properties the lecture attributes to CNNs?")
    have = _need(s, runs, "geometry")
    if not have:
        return s
    eq = _depth_frame(have, "geometry", "equivariance")
    if not eq.empty:
        d = eq[(eq["mode"] == "circular") & (eq["shift"] == eq["shift"].min())]
        d = d.groupby(["run", "depth", "layer"], sort=False)["error_interior"].mean().reset_index()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        sns.lineplot(d, x="depth", y="error_interior", hue="run", palette=colours, marker="o", ax=ax)
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
        ax.set_ylim(-0.02, 1.02)
        s["blocks"].append(_figure("Shift robustness of predictions", fig))
    erf = _depth_frame(have, "geometry", "erf")
    if not erf.empty:
        d = erf[erf["input"] == erf["input"].iloc[0]]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        sns.lineplot(d, x="depth", y="erf_side", hue="run", palette=colours, marker="o", ax=ax)
        sns.lineplot(d, x="depth", y="trf_in_image", hue="run", palette=colours, ax=ax, linestyle="--", legend=False)
        ax.set_title("Effective (solid, 95% of gradient mass) vs theoretical (dashed) receptive field")
        ax.set_ylabel("side (pixels)")
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


# 9. sweeps -----------------------------------------------------------------------------------------

def headline(run: RunData) -> dict:
    """The scalar numbers of every stage's metrics.json, as ``stage.key``."""
    out = {}
    for stage, m in run.metrics.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                out[f"{stage}.{k}"] = float(v)
    return out


def sweeps(runs: list[RunData], colours: dict) -> dict | None:
    """Runs that share a model and dataset and differ only in swept keys: mean +- std and the spread."""
    groups: dict[tuple, list[RunData]] = {}
    for r in runs:
        groups.setdefault((r.model, r.card["data"]["name"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    s = _section("sweeps", "Sweeps", "Runs of the same model on the same data, aggregated over what was swept "
                 "(mean ± std, n runs); the figure shows every run.")
    rows, points = [], []
    for (model, dataset), members in groups.items():
        swept = differing_keys(members)
        nums = pd.DataFrame([headline(r) for r in members])
        row = {"model": model, "dataset": dataset, "n": len(members), "swept": ", ".join(swept) or "-"}
        for col in [c for c in nums.columns if c.startswith("train.test_acc") or c.endswith("_mean")
                    or c in ("saliency.saliency.deletion_auc",)][:6]:
            vals = nums[col].dropna()
            row[col] = f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.4f}"
        rows.append(row)
        for r in members:
            points.append({"model": model, "run": r.label, "test accuracy": r.card["metrics"].get("test_acc")})
    s["blocks"].append(_table("Aggregates", pd.DataFrame(rows)))
    pts = pd.DataFrame(points)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.stripplot(pts, x="model", y="test accuracy", ax=ax, size=7, jitter=0.1)
    sns.pointplot(pts, x="model", y="test accuracy", ax=ax, errorbar="sd", color="black", markers="_", linestyles="none")
    ax.set_title("Test accuracy of every run (dots) with mean ± std")
    s["blocks"].append(_figure("Spread over the sweep", fig))
    return s
