"""A page per analysed layer of every run, and an atlas of its units (OpenAI Microscope's per-unit view, for any
model, side by side with the other runs).

Layer page: the layer's place in the network (type, output shape, receptive field, relative depth), its population
numbers (dead units with Wilson's interval, sparsity, class selectivity, equivariance error, out-activation of its
synthetic images), the layer's activation histogram, a strip of its most selective units (synthetic image beside the
top dataset exemplars, each exemplar labelled with its class), and links to the corresponding layer of every other
run: the same name in a run of the same model, else the layer of the same kind at the nearest relative depth.

Atlas: one card per unit, most class-selective first (dead units last): its synthetic image (the kernel itself for
the first conv layer), top exemplar crops, activation histogram, mean activation per class, its numbers, and for the
runs matched to it by ``probe compare`` (one-to-one matching of unit correlations, Li et al. 2016), its partner.

Relative depth (for aligning layers of different models): the position of the layer among the run's analysed
main-path layers in call order, 0 (first) to 1 (last); shortcut / downsample branches are not depth and have none.
"""

from __future__ import annotations

from functools import cached_property

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from probe.pipeline.report.claims import fmt_estimate, num
from probe.pipeline.report.collect import RunData, relative_depth
from probe.pipeline.report.figures import figure_uri, image_uri, minmax
from probe.pipeline.report.training import classes as class_names
from probe.uncertainty import proportion_interval

STRIP_UNITS = 12  # units on a layer page (the atlas has all)
CELL = 56  # px: displayed side of an image in the tables and cards


def kind(layer_type: str) -> str:
    return {"Conv2d": "conv", "Linear": "linear"}.get(layer_type, "pool" if "Pool" in layer_type else "other")


class LayerData:
    """One run's per-unit artefacts, read once (activations, synthesis, geometry); None where a stage is missing."""

    def __init__(self, r: RunData):
        self.r = r
        self.rows = {row["name"]: row for row in r.card["layers"]}

    @cached_property
    def stats(self) -> pd.DataFrame | None:
        return self.r.table("activations", "stats")

    @cached_property
    def layers(self) -> list[str]:
        """The analysed layers in call order."""
        if self.stats is None:
            return []
        order = self.r.layer_order()
        return sorted(self.stats["layer"].unique(), key=lambda n: order.get(n, 1 << 30))

    @cached_property
    def depth(self) -> dict[str, float]:
        return relative_depth(self.layers)

    @cached_property
    def class_means(self) -> pd.DataFrame | None:
        return self.r.table("activations", "class_means")

    @cached_property
    def hist(self) -> pd.DataFrame | None:
        return self.r.table("activations", "hist")

    @cached_property
    def exemplars(self) -> pd.DataFrame | None:
        return self.r.table("activations", "exemplars")

    @cached_property
    def crops(self):
        return self.r.arrays("activations", "exemplar_crops")

    @cached_property
    def synthesis(self) -> pd.DataFrame | None:
        df = self.r.table("synthesis", "metrics")
        return df[df["kind"] == "channel"] if df is not None and "kind" in df else None

    @cached_property
    def accentuated(self) -> pd.DataFrame | None:
        df = self.r.table("synthesis", "metrics")
        return df[df["kind"] == "accentuated"] if df is not None and "kind" in df else None

    @cached_property
    def synthesis_images(self):
        return self.r.arrays("synthesis", "images")

    @cached_property
    def filters(self):
        return self.r.arrays("activations", "filters")

    @cached_property
    def equivariance(self) -> pd.DataFrame | None:
        return self.r.table("geometry", "equivariance")

    def units(self, layer: str) -> pd.DataFrame:
        s = self.stats[self.stats["layer"] == layer].copy()
        for col in ("dead", "selectivity"):
            if col in s:
                s[col] = s[col].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        return s.sort_values("channel")

    def order(self, layer: str) -> list[int]:
        """Units most class-selective first (undefined selectivity after, dead units last)."""
        u = self.units(layer)
        sel = u["selectivity"].to_numpy(float) if "selectivity" in u else np.full(len(u), np.nan)
        sel = np.where((sel >= 0) & (sel <= 1), sel, -1.0)
        dead = u["dead"].to_numpy(float) == 1 if "dead" in u else np.zeros(len(u), bool)
        keys = sorted(range(len(u)), key=lambda i: (dead[i], -sel[i], int(u["channel"].iloc[i])))
        return [int(u["channel"].iloc[i]) for i in keys]

    def synthetic(self, layer: str, unit: int) -> np.ndarray | None:
        """The unit's synthetic image ``(C, H, W)`` in [0, 1]."""
        if self.synthesis is None or self.synthesis_images is None or "channel" not in self.synthesis_images.files:
            return None
        hit = self.synthesis[(self.synthesis["layer"] == layer) & (self.synthesis["channel"] == unit)]
        return self.synthesis_images["channel"][int(hit["image"].iloc[0])] if len(hit) else None

    def accentuation(self, layer: str, unit: int) -> tuple[np.ndarray, float | None] | None:
        """The unit's feature accentuation of its top exemplar ``(C, H, W)``, and its activation over the exemplar's."""
        a, z = self.accentuated, self.synthesis_images
        if a is None or z is None or "accentuated" not in z.files:
            return None
        hit = a[(a["layer"] == layer) & (a["channel"] == unit)]
        if not len(hit):
            return None
        gain = float(hit["activation"].iloc[0] - hit["dataset_activation"].iloc[0])
        return z["accentuated"][int(hit["image"].iloc[0])], gain if np.isfinite(gain) else None

    def kernel(self, layer: str, unit: int) -> tuple[np.ndarray, bool] | None:
        """The first conv layer's kernel of ``unit`` as an image, and whether it is signed (one input channel)."""
        if self.filters is None or f"{layer}/weight" not in self.filters.files or layer != self.first_conv:
            return None
        w = self.filters[f"{layer}/weight"][unit]  # (in, kh, kw)
        return (minmax(w, axes=(0, 1, 2)), False) if w.shape[0] == 3 else (w[:1], True)

    @cached_property
    def first_conv(self) -> str | None:
        return next((n for n in self.layers if self.rows.get(n, {}).get("type") == "Conv2d"), None)

    def exemplar_crops(self, layer: str, unit: int) -> tuple[np.ndarray, list[int]] | None:
        """Top dataset crops ``(k, C, h, w)`` in [0, 1] and their classes; None where the stage kept none."""
        z = self.crops
        if z is None or f"{layer}/crops" not in z.files or unit >= len(z[f"{layer}/crops"]):
            return None
        c = z[f"{layer}/crops"][unit]
        c = c / 255.0 if c.dtype == np.uint8 else c
        labels = []
        if self.exemplars is not None:
            e = self.exemplars[(self.exemplars["layer"] == layer) & (self.exemplars["channel"] == unit)].sort_values("rank")
            labels = [int(x) for x in e["label"]][: len(c)]
        return c, labels

    def profile(self, layer: str, unit: int) -> tuple[np.ndarray, str] | None:
        """Mean activation per class (of the rectified response where the layer has one)."""
        cm = self.class_means
        if cm is None:
            return None
        g = cm[(cm["layer"] == layer) & (cm["channel"] == unit)].sort_values("class")
        if g.empty:
            return None
        u = self.units(layer)
        rect = "rectified" in u and u["rectified"].notna().all() and (u["rectified"] != "none").all()
        col = "mean_rectified" if rect and "mean_rectified" in g and g["mean_rectified"].notna().all() else "mean"
        return g[col].to_numpy(float), "rectified activation" if col == "mean_rectified" else "activation"

    def unit_hist(self, layer: str, unit: int) -> pd.DataFrame | None:
        h = self.hist
        if h is None:
            return None
        g = h[(h["layer"] == layer) & (h["channel"] == unit)]
        return g if len(g) else None

    def equivariance_error(self, layer: str) -> float | None:
        e = self.equivariance
        if e is None:
            return None
        d = e[(e["layer"] == layer) & (e["mode"] == "circular")]
        if "measurable" in d:
            d = d[d["measurable"].astype(bool)]
        d = d[d["shift"] == d["shift"].min()] if len(d) else d
        return float(d["error_interior"].mean()) if len(d) else None


def counterpart(target: LayerData, source: LayerData, layer: str) -> tuple[str, str] | None:
    """The layer of ``target`` that corresponds to ``layer`` of ``source``, and why: the same name in the same model,
    else the analysed main-path layer of the same kind at the nearest relative depth."""
    if not target.layers:
        return None
    if target.r.model == source.r.model and layer in target.layers:
        return layer, "same layer"
    d = source.depth.get(layer)
    if d is None:
        return None
    k = kind(source.rows.get(layer, {}).get("type", ""))
    cands = [n for n in target.depth if kind(target.rows.get(n, {}).get("type", "")) == k] or list(target.depth)
    best = min(cands, key=lambda n: (abs(target.depth[n] - d), target.depth[n]))
    return best, f"nearest relative depth ({target.depth[best]:.2f} vs {d:.2f})"


def _img_cell(uri: str, alt: str, note: str = "") -> dict:
    return {"uri": uri, "alt": alt, "note": note, "size": CELL}


def place_table(ld: LayerData, layer: str) -> pd.DataFrame:
    row = ld.rows.get(layer, {})
    shape = row.get("output_shape")
    return pd.DataFrame([{
        "layer": layer, "type": row.get("type", ""), "output shape": "x".join(map(str, shape)) if shape else "",
        "parameters": row.get("params"),
        "receptive field (px)": "x".join(map(str, row["receptive_field"])) if row.get("receptive_field") else "",
        "RF stride (px)": "x".join(map(str, row["rf_stride"])) if row.get("rf_stride") else "",
        "relative depth": f"{ld.depth[layer]:.2f}" if layer in ld.depth else "branch (not on the main path)",
        "position": f"{ld.layers.index(layer) + 1} of {len(ld.layers)} analysed layers"}])


def population(ld: LayerData, layer: str, out_activation: dict | None) -> pd.DataFrame:
    u = ld.units(layer)
    rect = "rectified" in u and (u["rectified"].astype(str) != "none").all() and u["rectified"].notna().all()
    sel = u["selectivity"].to_numpy(float) if "selectivity" in u else np.array([])
    sel = sel[np.isfinite(sel) & (sel >= 0) & (sel <= 1)]
    row = {"units": len(u)}
    if rect and "dead" in u:
        k = int((u["dead"].to_numpy(float) == 1).sum())
        row["dead units [95% CI]"] = f"{k} of {len(u)}: " + fmt_estimate(proportion_interval(k, len(u)).to_dict())
    else:
        row["dead units [95% CI]"] = "undefined (no rectifier at this layer)"
    active = "frac_active_rectified" if rect and "frac_active_rectified" in u else "frac_active"
    row["sparsity (1 − mean fraction active)"] = 1 - float(u[active].mean())
    row["class selectivity: median [IQR]"] = (f"{num(np.median(sel))} [{num(np.quantile(sel, .25))}, "
                                              f"{num(np.quantile(sel, .75))}], n = {len(sel)}") if len(sel) else "undefined"
    eq = ld.equivariance_error(layer)
    row["equivariance error (1 px circular, interior)"] = eq if eq is not None else "not measured"
    for where in ("mean", "peak"):
        e = (out_activation or {}).get(where)
        row[f"synthetic images out-activate ({where})"] = fmt_estimate(e) if e else "not measured"
    return pd.DataFrame([row])


def histogram_figure(ld: LayerData, layer: str, colour) -> str | None:
    h = ld.hist
    if h is None:
        return None
    g = h[(h["layer"] == layer) & (h["channel"] == -1)]
    g = g[np.isfinite(g["lo"]) & np.isfinite(g["hi"])]
    if g.empty:
        return None
    zero = (g["lo"] == 0) & (g["hi"] == 0)
    nz = g[~zero]
    total = float(g["count"].sum())
    fig, ax = plt.subplots(figsize=(7, 2.8))
    centre = ((nz["lo"] + nz["hi"]) / 2).to_numpy()
    ax.fill_between(centre, 0, nz["count"].to_numpy() / total, color=colour, alpha=0.7, lw=0, step="mid")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("activation (symmetric log scale, linear within ±0.1)")
    ax.set_ylabel("share of values per bin")
    ax.set_ylim(0, None)
    share0 = float(g.loc[zero, "count"].sum()) / total if total else 0.0
    ax.set_title(f"{layer}: all units, all positions, all images ({share0:.0%} exactly 0, not drawn)", fontsize=10)
    fig.tight_layout()
    return figure_uri(fig)


def unit_strip(ld: LayerData, layer: str, units: list[int], atlas: str) -> dict | None:
    names = class_names(ld.r)
    rows, k_max = [], 0
    for unit in units:
        cells = [{"text": f"unit {unit}", "href": f"{atlas}#unit-{unit}"}]
        k = ld.kernel(layer, unit)
        syn = ld.synthetic(layer, unit)
        if k is not None:
            cells.append(_img_cell(image_uri(k[0], signed=k[1]), f"kernel of unit {unit}", "kernel"))
        elif syn is not None:
            cells.append(_img_cell(image_uri(syn), f"synthetic image of unit {unit}", "synthetic"))
        else:
            cells.append({"text": "no image"})
        acc = ld.accentuation(layer, unit)
        cells.append(_img_cell(image_uri(acc[0]), f"accentuated exemplar of unit {unit}", "accentuated")
                     if acc is not None else {"text": ""})
        ex = ld.exemplar_crops(layer, unit)
        if ex is not None:
            crops, labels = ex
            k_max = max(k_max, len(crops))
            for j, c in enumerate(crops):
                cls = names[labels[j]] if j < len(labels) and labels[j] < len(names) else ""
                cells.append(_img_cell(image_uri(c), f"exemplar {j + 1} of unit {unit}", f"class {cls}" if cls else ""))
        rows.append(cells)
    if not rows or k_max == 0:
        return None
    width = max(len(r) for r in rows)
    rows = [r + [{"text": ""}] * (width - len(r)) for r in rows]
    return {"kind": "images", "caption": f"The {len(units)} most class-selective units: synthetic image, its top "
            "exemplar accentuated (optimised for the unit while kept close to the whole exemplar image: Hamblin et al. "
            "2024), and top dataset exemplars (crops of the unit's receptive field, strongest first, each with its class)",
            "columns": ["unit", "image", "accentuated"] + [f"exemplar {j + 1}" for j in range(width - 3)], "rows": rows}


def _hist_svg(g: pd.DataFrame) -> dict | None:
    """A unit's histogram as an SVG polyline on a symmetric-log axis (linear within ±0.1), 48 bins."""
    g = g[np.isfinite(g["lo"]) & np.isfinite(g["hi"])]
    if g.empty:
        return None
    x = ((g["lo"] + g["hi"]) / 2).to_numpy()
    t = np.sign(x) * np.log10(1 + np.abs(x) / 0.1)
    lo, hi = float(min(t.min(), 0)), float(max(t.max(), 0))
    if hi - lo <= 0:
        return None
    counts, edges = np.histogram(t, bins=48, range=(lo, hi), weights=g["count"].to_numpy(float))
    y = 32 - 30 * counts / counts.max()
    xs = 300 * ((edges[:-1] + edges[1:]) / 2 - lo) / (hi - lo)
    back = lambda v: float(np.sign(v) * 0.1 * (10 ** abs(v) - 1))  # noqa: E731
    return {"points": " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, y)), "zero": f"{300 * (0 - lo) / (hi - lo):.1f}",
            "lo": num(back(lo)), "hi": num(back(hi)), "what": "symmetric log axis; dashed: 0"}


def _profile_svg(values: np.ndarray, names: list[str]) -> tuple[list[dict], str]:
    m = float(np.nanmax(np.abs(values))) if len(values) and np.isfinite(values).any() else 0.0
    base = 50.0 if (values >= 0).all() else 25.0
    span = 48.0 if base == 50 else 23.0
    w = 300 / max(len(values), 1)
    bars = []
    for i, v in enumerate(values):
        h = span * abs(v) / m if m > 0 and np.isfinite(v) else 0.0
        bars.append({"x": round(i * w + 1, 1), "w": round(w - 2, 1), "h": round(h, 1),
                     "y": round(base - h if v >= 0 else base, 1),
                     "name": names[i] if i < len(names) else str(i), "value": num(v)})
    return bars, num(m)


def card(ld: LayerData, layer: str, unit: int, u: pd.Series, colour: str, matches: list[dict]) -> dict:
    names = class_names(ld.r)
    images = []
    k = ld.kernel(layer, unit)
    syn = ld.synthetic(layer, unit)
    if k is not None:
        images.append({"uri": image_uri(k[0], signed=k[1]), "alt": "kernel", "what": "kernel", "width": CELL, "height": CELL})
    if syn is not None:
        images.append({"uri": image_uri(syn), "alt": "synthetic image", "what": "synthetic", "width": CELL, "height": CELL})
    acc = ld.accentuation(layer, unit)
    if acc is not None:
        images.append({"uri": image_uri(acc[0]), "alt": "accentuated top exemplar", "what": "accentuated",
                       "width": CELL, "height": CELL})
    ex = ld.exemplar_crops(layer, unit)
    if ex is not None:
        crops, labels = ex
        side = 36
        for j, c in enumerate(crops[:6]):
            cls = names[labels[j]] if j < len(labels) and labels[j] < len(names) else ""
            images.append({"uri": image_uri(c), "alt": f"exemplar {j + 1}", "what": f"#{j + 1}" + (f" ({cls})" if cls else ""),
                           "width": side, "height": side})
    elif ld.crops is not None:
        images.append({"uri": None, "what": "no exemplar crops kept for this unit (activations.crop_channels)"})
    prof = ld.profile(layer, unit)
    profile, pmax, pwhat = ([], "", "")
    if prof is not None:
        profile, pmax = _profile_svg(prof[0], names)
        pwhat = prof[1]
    hg = ld.unit_hist(layer, unit)
    sel = u.get("selectivity")
    dead = bool(u.get("dead") == 1) if "dead" in u and pd.notna(u.get("dead")) else False
    numbers = [("mean ± std", f"{num(u['mean'])} ± {num(u['std'])}"), ("min / max", f"{num(u['min'])} / {num(u['max'])}"),
               ("q01 / q50 / q99", f"{num(u['q01'])} / {num(u['q50'])} / {num(u['q99'])}"),
               ("fraction active", num(u.get("frac_active_rectified", u["frac_active"]))),
               ("class selectivity", num(sel) if sel is not None and np.isfinite(sel) and 0 <= sel <= 1 else "undefined")]
    if prof is not None and np.isfinite(prof[0]).any():
        numbers.append(("preferred class", names[int(np.nanargmax(prof[0]))] if len(names) > int(np.nanargmax(prof[0])) else ""))
    m = ld.synthesis
    if m is not None:
        hit = m[(m["layer"] == layer) & (m["channel"] == unit)]
        if len(hit) and "margin" in hit:
            numbers.append(("synthetic − best exemplar (mean / peak)",
                            f"{num(float(hit['margin'].iloc[0]))} / {num(float(hit['margin_peak'].iloc[0]))}"
                            if "margin_peak" in hit else num(float(hit['margin'].iloc[0]))))
        if len(hit) and "saturation" in hit and pd.notna(hit["saturation"].iloc[0]):
            numbers.append(("synthetic image saturation", num(float(hit["saturation"].iloc[0]))))
    if acc is not None and acc[1] is not None:
        numbers.append(("accentuated − its exemplar (mean)", num(acc[1])))
    return {"id": f"unit-{unit}", "title": f"{layer} · unit {unit}", "dead": dead, "images": images,
            "profile": profile, "profile_max": pmax, "profile_what": pwhat, "colour": colour,
            "hist": _hist_svg(hg) if hg is not None else None, "numbers": numbers, "matches": matches}
