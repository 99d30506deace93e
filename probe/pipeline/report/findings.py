"""The report's first page: what differs between the runs and what each analysis concluded, in sentences written
from the metrics files (never by hand), each with its number and its interval or p; and the headline table per run.

Every finding names the file it comes from. A verdict word ("beats random", "further apart than two seeds")
is the sections' own (:func:`probe.pipeline.report.claims.verdict`: Holm-adjusted p below 0.05 and the interval
clear of 0); the findings only count and quote them.
"""

from __future__ import annotations

from probe.pipeline.report import training
from probe.pipeline.report.claims import counts, fmt_comparison, fmt_estimate, is_estimate
from probe.pipeline.report.collect import RunData
from probe.pipeline.report.sections import baseline_pairs, out_activation, saliency_methods, survival_parts, untrained


def _finding(text: str, source: str) -> dict:
    return {"text": text, "source": source}


def _kn(e: dict | None) -> str:
    kn = counts(e) if is_estimate(e) else None
    return f"{kn[0]} of {kn[1]}" if kn else "not measured"


def beating_random(r: RunData) -> tuple[int, int, int] | None:
    """(methods whose deletion AUC beats random orders, whose insertion AUC does, methods) from saliency/metrics.json:
    distinguishable and in the better direction (lower deletion, higher insertion)."""
    from probe.pipeline.report.claims import verdict

    if not r.has("saliency"):
        return None
    m = r.metrics["saliency"]
    methods = saliency_methods(m)
    d = sum(verdict(m[x].get("deletion_vs_random"), "y", "n", "n", -1) == "y" for x in methods)
    i = sum(verdict(m[x].get("insertion_vs_random"), "y", "n", "n", 1) == "y" for x in methods)
    return d, i, len(methods)


def headline_rows(runs: list[RunData], transferred: tuple | None = None) -> list[dict]:
    """One row per run: the numbers the README's findings table states, from each stage's metrics.json (and the
    comparison's transfer matrix, ``transferred``: :func:`probe.pipeline.report.sections.transfer`'s result)."""
    rows = []
    recognised = transferred[2] if transferred else {}
    for r in runs:
        acc = training.accuracy(r)
        row = {"run": r.label, "model": r.model, "epochs": training_epochs(r),
               "test accuracy [95% CI]": (f"{_kn(acc)}: " + fmt_estimate(acc)) if acc else
               (f"{r.card['metrics'].get('test_acc'):.3f}" if r.card["metrics"].get("test_acc") is not None else "")}
        a = r.metrics.get("activations", {})
        dead = a.get("dead_fraction_interval")
        row["dead units, rectified layers [95% CI]"] = (f"{_kn(dead)}: " + fmt_estimate(dead)) if is_estimate(dead) else "not measured"
        b = beating_random(r)
        row["saliency methods beating random orders (deletion / insertion)"] = f"{b[0]} / {b[1]} of {b[2]}" if b else "not measured"
        s = r.metrics.get("synthesis", {})
        row["class images predicted as their class"] = _kn(s.get("class_probability", {}).get("predicted"))
        row["its class images recognised by the other trained runs"] = _kn(recognised.get(r.label))
        pooled = s.get("channel", {}).get("all", {}) if isinstance(s.get("channel"), dict) else {}
        row["channel images out-activating the best exemplar (mean / peak)"] = (
            f"{_kn(pooled.get('out_activates_mean'))} / {_kn(pooled.get('out_activates_peak'))}" if pooled else "not measured")
        kept = {n: e for n, axis, mode, e in survival_parts(r) if axis == "x" and mode == "zero"}
        row["predictions kept by a shift along x, zero fill (1 / 2 / 4 px)"] = (
            " / ".join(_kn(kept.get(n)) for n in (1, 2, 4)) if kept else "not measured")
        rows.append(row)
    return rows


def training_epochs(r: RunData):
    return r.card.get("train", {}).get("epochs", r.card.get("metrics", {}).get("epochs"))


def findings(runs: list[RunData], parts: list[dict], comparison_metrics: dict | None,
             transferred: tuple | None = None) -> list[dict]:
    """Sentences, in the order a reader asks: how good is each net, how do they differ, what each analysis found."""
    out = []
    accs = [(r, training.accuracy(r)) for r in runs]
    accs = [(r, a) for r, a in accs if a]
    if accs:
        accs.sort(key=lambda x: -x[1]["value"])
        out.append(_finding("Test accuracy: " + "; ".join(f"{r.label} {fmt_estimate(a)}" for r, a in accs)
                            + " (Wilson's 95% interval over the test images).", "card.json evaluation"))
    claims = [c for p in parts for c in p.get("claims", [])]
    if comparison_metrics:
        band = [(k, v) for k, v in comparison_metrics.get("cka_last_conv", {}).items()]
        se = comparison_metrics.get("cka_last_conv_se", {})
        seeds = _seed_pairs(runs)
        for pair, (a, b) in seeds.items():
            if pair in dict(band):
                from probe.uncertainty import se_interval

                e = se_interval(dict(band)[pair], se.get(pair, float("nan")), comparison_metrics.get("batches", 2) - 1)
                out.append(_finding(f"Two seeds of {a.model} ({a.label}, {b.label}) are the yardstick: their last conv layers "
                                    f"have linear CKA {fmt_estimate(e.to_dict())} minibatches.",
                                    f"comparisons metrics.json cka_last_conv[{pair}]"))
        cross = [c for c in claims if c["section"] == "comparison" and "seed band" in c["subject"]]
        if cross:
            further = [c for c in cross if c["statement"].startswith("further apart")]
            closer = [c for c in cross if c["statement"].startswith("closer")]
            text = (f"Across models, {len(cross)} comparisons of corresponding conv layers with the seed band: "
                    f"{len(further)} further apart than two seeds, {len(closer)} closer, "
                    f"{len(cross) - len(further) - len(closer)} not distinguishable (Holm)")
            last = [c for c in cross if c["subject"].startswith("last conv")]
            if last:
                c = min(last, key=lambda c: c["stat"]["effect"])
                text += f"; the largest gap: {c['run']}, {c['subject']}: {fmt_comparison(c['stat'])}"
            out.append(_finding(text + ".", "comparisons cka.parquet, with each run's seed band"))
        lo, hi = (comparison_metrics.get(f"units_matched_above_{t}", {}) for t in ("0.5", "0.8"))
        for pair, (a, b) in seeds.items():
            if pair in lo and pair in hi:
                out.append(_finding(f"Units agree less than layers: {lo[pair]:.0%} of {a.model}'s conv and linear units "
                                    f"have a one-to-one partner in the other seed correlating above 0.5, {hi[pair]:.0%} "
                                    f"above 0.8 ({a.label}, {b.label}).", "comparisons metrics.json units_matched_above_*"))
    for t, u in baseline_pairs(runs):
        mine = [c for c in claims if c["section"] == "baseline" and c["run"] == t.label and f"against {u.label}" in c["subject"]]
        if mine:
            differ = [c for c in mine if c["statement"] == "trained differs from random"]
            dead = next((c for c in mine if c["subject"].startswith("dead units")), None)
            text = (f"{t.label} differs from its untrained twin {u.label} on {len(differ)} of {len(mine)} measures "
                    "(Holm within each stage)")
            if dead:
                text += f"; dead units: {dead['statement']}, {fmt_comparison(dead['stat'])}"
            out.append(_finding(text + ".", "each stage's metrics.json of both runs"))
    for r in runs:
        b = beating_random(r)
        if b and not untrained(r):
            order = any(blk["kind"] == "text" and blk["text"].startswith(f"{r.label}: every metric")
                        for p in parts if p["id"] == "saliency" for blk in p["blocks"])
            out.append(_finding(f"{r.label}: {b[0]} of {b[2]} saliency methods delete the evidence faster than random pixel "
                                f"orders and {b[1]} insert it faster (each Holm-adjusted); "
                                + ("every faithfulness metric agrees on one order of the methods." if order else
                                   "the faithfulness metrics do not agree on one order of the methods."),
                                "saliency/metrics.json"))
    for r in runs:
        rows = {row["layer"]: row for row in out_activation(r)} if r.has("synthesis") else {}
        pred = r.metrics.get("synthesis", {}).get("class_probability", {}).get("predicted")
        pooled = r.metrics.get("synthesis", {}).get("channel", {}).get("all", {})
        if rows and is_estimate(pred) and not untrained(r):
            peak = pooled.get("out_activates_peak")
            out.append(_finding(f"{r.label}: {_kn(pred)} class images are predicted as their class; "
                                + (f"at the unit's peak, {_kn(peak)} channel images out-activate the best dataset image "
                                   f"({fmt_estimate(peak)})." if is_estimate(peak) else ""),
                                "synthesis/metrics.json"))
    # the fair null first: an untrained network that is not the run's own initialisation
    shared = sorted((c for c in claims if c["section"] == "concepts" and "seed_share" in c), key=lambda c: c["same_init"])
    shared = shared[0] if shared else None
    if shared:
        halves = next((c["stat"] for c in claims if c["section"] == "concepts" and c["run"] == shared["run"]
                       and "two halves" in c["subject"]), None)
        out.append(_finding(f"Concepts (CRAFT, {shared['run']}'s {shared['layer']}): {_kn(shared['seed_share'])} have a "
                            f"partner in the other seed {shared['seed_run']} ({fmt_estimate(shared['seed_share'])}) and "
                            f"{_kn(shared['untrained_share'])} in the untrained {shared['untrained_run']}"
                            + (" (its own initial weights)" if shared["same_init"] else "") + " "
                            f"({fmt_estimate(shared['untrained_share'])}), coefficients correlating above "
                            f"{shared['threshold']} on the same images: {shared['statement']}, {fmt_comparison(shared['stat'])}"
                            + (f"; {_kn(halves)} are found again in the other half of the data." if is_estimate(halves) else "."),
                            "comparisons concepts.parquet, concepts/metrics.json"))
    _, pooled, per_maker = transferred or (None, None, {})
    if pooled:
        out.append(_finding(f"The other trained runs recognise {_kn(pooled)} of the trained runs' class images "
                            f"({fmt_estimate(pooled)}; by the run that made them: "
                            + ", ".join(f"{m} {_kn(e)}" for m, e in per_maker.items()) + ").",
                            "comparisons transfer.parquet"))
    return out


def _seed_pairs(runs: list[RunData]) -> dict[str, tuple[RunData, RunData]]:
    """``"a~b"`` (sorted, as probe compare writes it) -> the two runs, for runs that differ only in seed."""
    from itertools import combinations

    from probe.pipeline.report.collect import seed_groups

    out = {}
    for g in seed_groups(runs):
        for a, b in combinations(g, 2):
            out["~".join(sorted((a.label, b.label)))] = (a, b)
    return out


def markdown(rows: list[dict], items: list[dict]) -> str:
    """The headline table and the findings as Markdown (``findings.md``: paste into a README or a paper's notes)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    lines += [""] + [f"- {f['text']}" for f in items]
    return "\n".join(lines) + "\n"
