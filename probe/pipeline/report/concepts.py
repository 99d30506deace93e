"""The report's concepts page: what one layer of each run encodes, found in its own activations (CRAFT, Fel et al.,
CVPR 2023, arXiv:2211.10154), and which concepts two runs share.

From each run's ``probe concepts`` folder: the fit (reconstruction error, the k-curve, split-half stability with
Wilson's interval), each concept's top crops with the class it is most present in and the class whose logit
depends on it most (total Sobol index), the importance table, and concept heatmaps on the probe images. From the
comparison folder (``probe compare``'s ``concepts.parquet``): the concepts of two runs matched one to one by the
correlation of their per-image coefficients, as k of n matched above the threshold with Wilson's interval; and,
for a run with both a seed twin and an untrained twin, whether it shares more concepts with the other seed than
with its own random initialisation (Fisher's exact test, Holm over the family).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from probe.pipeline.report.claims import claim, fmt_comparison, fmt_estimate, is_estimate, num, verdict
from probe.pipeline.report.collect import RunData, seed_groups
from probe.pipeline.report.figures import heat_overlay, image_uri
from probe.pipeline.report.sections import _figure, _need, _section, _table, baseline_pairs, untrained
from probe.pipeline.rundir import weights_digest
from probe.uncertainty import adjust, proportions_comparison

CROPS = 8  # top crops shown per concept
HEATMAP_CONCEPTS = 3  # concepts shown on the probe images: the most important ones
MATCHED_SHOWN = 5  # matched concepts shown with their crops, per pair of trained runs


def _class_name(r: RunData, c: int) -> str:
    names = r.card.get("data", {}).get("classes") or []
    return str(names[c]) if c < len(names) else str(c)


def _crop(img: np.ndarray, note: str, alt: str) -> dict:
    return {"uri": image_uri(img.astype(np.float32) / 255), "alt": alt, "size": 40, "note": note}


def matches(runs: list[RunData], folder: str | None) -> tuple[pd.DataFrame, dict]:
    """``probe compare``'s ``concepts.parquet`` restricted to the runs on the page whose weights are those the
    comparison was computed from, and its metrics' ``concepts_matched`` (empty where the comparison has none)."""
    path = Path(folder) / "concepts.parquet" if folder else None
    if path is None or not path.is_file() or not (Path(folder) / "metrics.json").is_file():
        return pd.DataFrame(), {}
    metrics = json.loads((Path(folder) / "metrics.json").read_text())
    recorded = metrics.get("weights_sha256", {})
    labels = {r.label for r in runs if (r.path / "model.safetensors").is_file() and recorded.get(r.label) == weights_digest(r.path)}
    t = pd.read_parquet(path)
    t = t[t["run_a"].isin(labels) & t["run_b"].isin(labels)]
    shares = metrics.get("concepts_matched", {})
    return t, {k: v for k, v in shares.items() if k == "threshold" or set(k.split("~")) <= labels}


def seed_versus_untrained(runs: list[RunData], shares: dict) -> list[tuple[RunData, RunData, RunData, dict]]:
    """(run, its seed twin, its untrained twin, Comparison of the shares matched with each), Holm-adjusted over
    every such triple: does a network share more concepts with another training of itself than with its own
    random initialisation?"""
    untrained_of = dict((t.label, u) for t, u in baseline_pairs(runs))
    found = []
    for group in seed_groups(runs):
        for a in group:
            u = untrained_of.get(a.label)
            for b in (x for x in group if x is not a and not untrained(x)):
                seed, rand = (shares.get("~".join(sorted((a.label, o.label)))) if o else None for o in (b, u))
                if u is not None and is_estimate(seed) and is_estimate(rand):
                    found.append((a, b, u, proportions_comparison(seed["k"], seed["n"], rand["k"], rand["n"])))
                    break
    adjusted = adjust([c for *_, c in found])
    return [(a, b, u, c.to_dict()) for (a, b, u, _), c in zip(found, adjusted)]


def concepts(runs: list[RunData], folder: str | None) -> dict:
    s = _section("concepts", "Concepts (CRAFT)",
                 "Units are often polysemantic; the directions a layer uses are found in its activations over the "
                 "images instead. One layer per run is factorised, A ≈ U W with non-negative U and W (NMF), over its "
                 "rectified activations, one row per image position: each row of W is a concept, a non-negative mix "
                 "of channels. A concept's top crops are the receptive fields where its coefficient peaks; its "
                 "importance for a class is CRAFT's total Sobol index of the class logit when the concept "
                 "coefficients are masked in the layer (the share of the logit's variance it accounts for, with its "
                 "interactions; 0: the logit ignores it). Stability: the same fit on two halves of the positions, "
                 "concepts matched by the cosine of their directions. Across runs, whose channels are unrelated, "
                 "concepts are matched by the correlation of their coefficients over the same images.")
    have = _need(s, runs, "concepts")
    if not have:
        return s
    fit_rows, curve_rows = [], []
    for r in have:
        m = r.metrics["concepts"]
        row = {"run": r.label, "layer": m["layer"], "concepts": f"{m['k']} of {m['channels']} channels",
               "images": m["images"], "positions fitted": f"{m['rows_kept']:,} of {m['rows_seen']:,}",
               "relative error (fit)": m["reconstruction_error"],
               "relative error (every position)": m["reconstruction_error_all"]}
        st = m.get("stability")
        if is_estimate(st):
            row[f"stable between two halves (cosine > {st['threshold']}) [95% CI]"] = (
                f"{st['k']} of {st['n']}: " + fmt_estimate(st))
            s["claims"].append(claim("concepts", r.label, f"{m['layer']}: concepts matched between two halves of the "
                                     f"positions above cosine {st['threshold']}", "fraction", st))
        fit_rows.append(row)
        curve_rows += [{"run": r.label, "k": int(k), "relative error": float(e)} for k, e in m.get("k_curve", {}).items()]
    s["blocks"].append(_table("The fit of each run's layer: the relative reconstruction error ||A − UW|| / ||A|| on the "
                              "fitted sample and on every position of the split (W fixed), and split-half stability",
                              pd.DataFrame(fit_rows)))
    curve = pd.DataFrame(curve_rows)
    if len(curve) and curve.groupby("run")["k"].nunique().max() > 1:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        sns.lineplot(curve, x="k", y="relative error", hue="run", marker="o", ax=ax)
        ax.set_ylim(0, max(1.0, float(curve["relative error"].max()) * 1.05))
        ax.set_title("Reconstruction error against the number of concepts (choose k)")
        ax.set_xlabel("concepts k")
        ax.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        s["blocks"].append(_figure("The k-curve: relative reconstruction error of the fit for each k", fig))
    strips = _matching_blocks(s, runs, have, folder)
    for r in have:
        _run_blocks(s, r)
    s["blocks"].extend(strips)
    return s


def _matching_blocks(s: dict, runs: list[RunData], have: list[RunData], folder: str | None) -> list[dict]:
    """The table of shared concepts and the seed-against-untrained sentences (added to ``s``); returned: for each
    pair of trained runs, its concepts matched above the threshold, their top crops side by side."""
    t, shares = matches(have, folder)
    if not len(t):
        if len(have) > 1:
            s["blocks"].append({"kind": "text", "text": "The concepts are not matched across runs: the report was given "
                                "no comparison with concepts (run probe compare after probe concepts)."})
        return []
    threshold = shares.get("threshold", 0.8)
    rows = []
    for (a, b), g in t.groupby(["run_a", "run_b"], sort=False):
        e = shares.get(f"{a}~{b}")
        rows.append({"run a": f"{a} ({g['layer_a'].iloc[0]})", "run b": f"{b} ({g['layer_b'].iloc[0]})",
                     f"matched above {threshold} [95% CI]": (f"{e['k']} of {e['n']}: " + fmt_estimate(e)) if e else "",
                     "median correlation": float(g["corr"].median()), "lowest": float(g["corr"].min())})
        if e:
            s["claims"].append(claim("concepts", a, f"concepts with a partner in {b} correlating above {threshold}",
                                     "fraction", e))
    s["blocks"].append(_table(f"Concepts shared between runs: each concept of one run matched one to one (Hungarian) with "
                              f"a concept of the other by the Pearson correlation of their per-image coefficients on the "
                              f"same images; matched above {threshold}: k of n with Wilson's interval", pd.DataFrame(rows)))
    for a, b, u, c in seed_versus_untrained(runs, shares):
        words = verdict(c, "more shared with the other seed", "more shared with the untrained twin", "not distinguishable")
        seed, rand = (shares["~".join(sorted((a.label, o.label)))] for o in (b, u))
        same = " (its own initial weights: the same seed)" if a.card.get("seed") == u.card.get("seed") else ""
        s["blocks"].append({"kind": "text", "text": f"{a.label} shares {seed['k']} of {seed['n']} concepts with the other "
                            f"seed {b.label} and {rand['k']} of {rand['n']} with its untrained twin {u.label}{same}: "
                            f"{words} (difference of shares {fmt_comparison(c)}, Fisher's exact test, Holm-adjusted)."})
        s["claims"].append(claim("concepts", a.label, f"concepts shared with {b.label} against with {u.label}", words, c,
                                 layer=a.metrics["concepts"]["layer"], seed_run=b.label, seed_share=seed,
                                 untrained_run=u.label, untrained_share=rand, threshold=threshold, same_init=bool(same)))
    by_label, strips = {r.label: r for r in have}, []
    for (a, b), g in t.groupby(["run_a", "run_b"], sort=False):
        ra, rb = by_label.get(a), by_label.get(b)
        if ra is None or rb is None or untrained(ra) or untrained(rb):
            continue
        za, zb = ra.arrays("concepts", "concepts"), rb.arrays("concepts", "concepts")
        if za is None or zb is None:
            continue
        cells = []
        for row in g[g["corr"] > threshold].sort_values("corr", ascending=False).head(MATCHED_SHOWN).itertuples():
            i, j = int(row.concept_a), int(row.concept_b)
            cells.append([{"text": f"{a} #{i} ↔ {b} #{j}: r = {num(float(row.corr), 2)}"}]
                         + [_crop(c, "", f"{a} concept {i} crop") for c in za["top_crops"][i][:4]]
                         + [{"text": "↔"}]
                         + [_crop(c, "", f"{b} concept {j} crop") for c in zb["top_crops"][j][:4]])
        if cells:
            strips.append({"kind": "images", "caption": f"{a} and {b}: concepts matched above {threshold} (at most "
                           f"{MATCHED_SHOWN}, best first), the top crops of each side by side", "columns": [], "rows": cells})
    return strips


def _run_blocks(s: dict, r: RunData) -> None:
    z = r.arrays("concepts", "concepts")
    table = r.table("concepts", "concepts")
    if z is None or table is None:
        return
    m = r.metrics["concepts"]
    presence, importance = z["presence"], z["importance"]
    k = len(z["W"])
    rows = []
    for j in range(k):
        present = int(np.nanargmax(presence[:, j])) if np.isfinite(presence[:, j]).any() else None
        used = int(np.nanargmax(importance[:, j])) if np.isfinite(importance[:, j]).any() else None
        text = f"concept {j}" + (f" · most present in {_class_name(r, present)}" if present is not None else "") + (
            f" · matters most to {_class_name(r, used)} ({num(float(importance[used, j]), 2)})" if used is not None else "")
        rows.append([{"text": text}] + [_crop(c, "", f"{r.label} concept {j}, top crop {n}")
                                        for n, c in enumerate(z["top_crops"][j][:CROPS])])
    s["blocks"].append({"kind": "images", "caption": f"{r.label}: the {k} concepts of {m['layer']}, each by its top "
                        f"{min(CROPS, z['top_crops'].shape[1])} crops (the receptive field where its coefficient peaks), "
                        "ordered by their total coefficient", "columns": [], "rows": rows})
    n_cls = importance.shape[0]
    imp = pd.DataFrame({"concept": np.arange(k)} | {_class_name(r, c): importance[c] for c in range(n_cls)})
    per_image = table.groupby("class")["importance_images"].first()
    s["blocks"].append(_table(f"{r.label}: importance of each concept for each class's logit (total Sobol index, the mean "
                              f"over {int(per_image.min())}–{int(per_image.max())} images of the class; "
                              f"{m['importance']['n_designs']} masks per image)", imp, digits=2))
    order = np.argsort(-np.nan_to_num(np.nanmean(importance, 0), nan=-1))[:HEATMAP_CONCEPTS]
    images, maps = z["probe_images"], z["heatmaps"]
    labels = z["probe_labels"]
    heads = [_class_name(r, int(c)) for c in labels]
    cells = []
    for j in order:
        over = heat_overlay(images, maps[:, j], peak=float(maps[:, j].max()))  # one scale for the concept
        cells.append([{"text": f"concept {j}"}] + [{"uri": image_uri(img), "alt": f"concept {j} on a probe image of "
                                                    f"{h}", "size": 48} for img, h in zip(over, heads)])
    s["blocks"].append({"kind": "images", "caption": f"{r.label}: where the {len(order)} most important concepts are on "
                        "the probe images (red: the concept's coefficient, upsampled, on one scale per concept)", "columns": [""] + heads,
                        "rows": cells})
