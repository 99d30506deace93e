"""``probe report``: any set of run dirs or a Hydra sweep -> ``reports/<name>/``: ``index.html`` (findings first),
a page per analysis, per run, per layer, an atlas of every unit, ``img/``, ``findings.md`` and ``report.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from matplotlib.colors import to_hex

from probe.pipeline.report import findings as F
from probe.pipeline.report import layers as L
from probe.pipeline.report import sections, training
from probe.pipeline.report.collect import RunData, differing_keys, load_runs
from probe.pipeline.report.comparison import comparison
from probe.pipeline.report.concepts import concepts as concepts_section
from probe.pipeline.report.config import ReportStage
from probe.pipeline.report.figures import image_uri, palette
from probe.pipeline.report.pages import page, render_site, unique_slugs, write_site
from probe.pipeline.rundir import find_run_dirs, staged_dir
from probe.files import write_json

log = logging.getLogger(__name__)

# analysis pages: file, title, the section builders drawn on it
ANALYSES = (("activations.html", "Activations"), ("saliency.html", "Saliency"), ("synthesis.html", "Synthesis"),
            ("geometry.html", "Geometry"), ("concepts.html", "Concepts"), ("baseline.html", "Trained vs random"),
            ("sweeps.html", "Sweeps"))


def untrained_of(runs):
    """A run -> the untrained run of its model on the page (None where there is none)."""
    pairs = dict((t.label, u) for t, u in sections.baseline_pairs(runs))
    return lambda r: pairs.get(r.label)


class Names:
    """File names of the pages of every run and layer (slugs of labels and layer names, unique)."""

    def __init__(self, runs: list[RunData], data: dict[str, L.LayerData]):
        self.run = unique_slugs([r.label for r in runs])
        self.layer = {r.label: unique_slugs(data[r.label].layers) for r in runs}

    def run_page(self, label: str) -> str:
        return f"run-{self.run[label]}.html"

    def layer_page(self, label: str, layer: str) -> str:
        return f"layer-{self.run[label]}-{self.layer[label][layer]}.html"

    def atlas_page(self, label: str, layer: str) -> str:
        return f"atlas-{self.run[label]}-{self.layer[label][layer]}.html"


def _section(sid: str, title: str, intro: str = "", blocks: list | None = None) -> dict:
    return {"id": sid, "title": title, "intro": intro, "blocks": blocks or [], "missing": [], "claims": []}


def _figure(caption: str, uri: str | None) -> list[dict]:
    return [{"kind": "figure", "caption": caption, "uri": uri}] if uri else []


def index_page(runs, names, colours, found, rows, comp, analyses_parts) -> dict:
    top = _section("findings", "Findings", "What differs between the runs and what each analysis concluded, written from "
                   "the metrics files; each number with its 95% interval (and p where it is a comparison).",
                   [{"kind": "findings", "items": found}])
    if rows:
        top["blocks"].append(sections._table("Headline numbers per run (from each stage's metrics.json; findings.md "
                                             "holds this table as Markdown)", pd.DataFrame(rows),
                                             wrap=()))
    train = _section("training", "Training", "Every run's curves, and its test accuracy per class.",
                     _figure("Accuracy and loss per epoch, one colour per run (untrained runs have no curve)",
                             training.curves_figure(runs, colours))
                     + _figure("Test accuracy per class with Wilson's 95% interval, runs side by side",
                               training.per_class_figure(runs, colours)))
    overview = sections.overview(runs)
    overview["id"], overview["title"] = "runs", "Runs"
    link_rows = [{"run": {"text": r.label, "href": names.run_page(r.label)}, "model": r.model,
                  "seed": r.card["seed"], "epochs": F.training_epochs(r), "params": r.card["params_total"],
                  "layer pages": len(names.layer[r.label])} for r in runs]
    overview["blocks"].insert(0, sections._table("Every run, with a page of its own", pd.DataFrame(link_rows)))
    overview["blocks"] = [overview["blocks"][0]] + overview["blocks"][2:]  # the link table replaces the plain one
    links = _section("analyses", "Analyses", "", [{"kind": "links", "caption": "", "items": [
        {"text": title, "href": href, "note": ", ".join(p["title"] for p in parts)}
        for (href, title), parts in analyses_parts if parts]}])
    return page("index.html", "Findings", [top, train, comp, overview, links], reading=True)


def run_page(r: RunData, others: list[RunData], names: Names, data, colours) -> dict:
    ld = data[r.label]
    c = r.card
    facts = _section("run", "The run", "", [sections._table("Card", pd.DataFrame([{
        "model": r.model, "dataset": c["data"]["name"], "seed": c["seed"], "parameters": c["params_total"],
        "epochs": F.training_epochs(r), "test accuracy [95% CI]": F.headline_rows([r])[0]["test accuracy [95% CI]"],
        "folder": str(r.path)}]))])
    diff = differing_keys([r, *others])
    if diff:
        facts["blocks"].append(sections._table("Configuration keys in which the runs of this report differ",
                                               pd.DataFrame([{"key": k, "value": r.config.get(k)} for k in diff])))
    train = _section("training", "Training", "", _figure("Accuracy and loss per epoch", training.curves_figure([r], colours))
                     + _figure("Confusion matrix on the test split", training.confusion_figure(r)))
    rows = []
    for i, row in enumerate(c["layers"], 1):
        name = row["name"]
        analysed = name in names.layer[r.label]
        rows.append({"#": i, "layer": {"text": name, "href": names.layer_page(r.label, name)} if analysed else name,
                     "type": row["type"], "output shape": "x".join(map(str, row["output_shape"])),
                     "params": row["params"],
                     "RF": "x".join(map(str, row["receptive_field"])) if row.get("receptive_field") else "",
                     "RF stride": "x".join(map(str, row["rf_stride"])) if row.get("rf_stride") else "",
                     "relative depth": f"{ld.depth[name]:.2f}" if name in ld.depth else "",
                     "units": {"text": "atlas", "href": names.atlas_page(r.label, name)} if analysed else ""})
    arch = _section("layers", "Layers", "The layer table as in the lecture, with each layer's theoretical receptive "
                    "field (RF) and its stride in input pixels; analysed layers link to their page and their atlas of "
                    "units. Relative depth: the layer's position among the analysed main-path layers (0 first, 1 last).",
                    [sections._table(f"{r.model}: {c['params_total']:,} parameters", pd.DataFrame(rows))])
    if not ld.layers:
        arch["missing"].append({"run": r.label, "command": sections.stage_command("activations", r.path)})
    return page(names.run_page(r.label), f"{r.label}: {r.model}", [facts, train, arch])


def layer_pages(r: RunData, runs: list[RunData], names: Names, data, colours, matches) -> list[dict]:
    ld = data[r.label]
    colour = to_hex(colours[r.label])
    out_act = {row["layer"]: row for row in sections.out_activation(r)} if r.has("synthesis") else {}
    pages = []
    for layer in ld.layers:
        order = ld.order(layer)
        atlas = names.atlas_page(r.label, layer)
        links = []
        for o in runs:
            if o is r:
                continue
            hit = L.counterpart(data[o.label], ld, layer)
            if hit:
                links.append({"text": f"{o.label}: {hit[0]}", "href": names.layer_page(o.label, hit[0]), "note": hit[1]})
        place = _section("place", "Place in the network", "", [
            sections._table("Layer", L.place_table(ld, layer)),
            {"kind": "links", "caption": "The corresponding layer in the other runs", "items": links},
            {"kind": "links", "caption": "", "items": [{"text": f"all {len(order)} units of {layer} in the atlas", "href": atlas}]}])
        pop = _section("population", "Population", "Over the whole analysed split, every position and image.",
                       [sections._table("Numbers", L.population(ld, layer, out_act.get(layer)))]
                       + _figure("Distribution of the layer's activations", L.histogram_figure(ld, layer, colour)))
        strip = L.unit_strip(ld, layer, order[:L.STRIP_UNITS], atlas)
        units = _section("units", "Units", "", [strip] if strip else [{"kind": "text", "text": "No exemplar crops for this layer."}])
        pages.append(page(names.layer_page(r.label, layer), f"{r.label} · {layer}", [place, pop, units]))
        cards = []
        table = ld.units(layer).set_index("channel")
        for unit in order:
            ms = []
            for other, partner, corr in matches.get((r.label, layer, unit), []):
                o = data[other]
                img = o.kernel(layer, partner)
                img = (img[0], img[1]) if img else ((o.synthetic(layer, partner), False) if o.synthetic(layer, partner) is not None else None)
                ms.append({"text": f"matched in {other} (one-to-one, r = {corr:.2f}):",
                           "link": f"unit {partner}", "href": f"{names.atlas_page(other, layer)}#unit-{partner}",
                           "uri": image_uri(*img) if img else None, "width": 36, "height": 36})
            cards.append(L.card(ld, layer, unit, table.loc[unit], colour, ms))
        pages.append(page(atlas, f"{r.label} · {layer}: atlas of units", [_section(
            "atlas", f"{len(order)} units, most class-selective first", "Each card: the unit's synthetic image (the kernel "
            "for the first conv layer), its top dataset exemplars with their classes, its mean activation per class, its "
            "activation histogram and its numbers; dead units come last. Where probe compare matched units across runs "
            "of this architecture, the partner is shown.", [{"kind": "cards", "items": cards}])]))
    return pages


def unit_matches(runs: list[RunData], folder: str | None) -> dict:
    """(run, layer, unit) -> [(other run, partner unit, correlation)] from the comparison's one-to-one matching."""
    if folder is None or not (Path(folder) / "units.parquet").is_file():
        return {}
    labels = {r.label for r in runs}
    u = pd.read_parquet(Path(folder) / "units.parquet")
    u = u[(u.matching == "one_to_one") & u.run_a.isin(labels) & u.run_b.isin(labels)]
    out: dict = {}
    for row in u.itertuples(index=False):
        out.setdefault((row.run_a, row.layer, int(row.unit_a)), []).append((row.run_b, int(row.unit_b), float(row.corr)))
        out.setdefault((row.run_b, row.layer, int(row.unit_b)), []).append((row.run_a, int(row.unit_a), float(row.corr)))
    return out


def render(cfg: ReportStage) -> tuple[dict[str, bytes], dict]:
    """Every file of the report (relative path -> bytes) and its numbers, for the runs ``cfg`` names."""
    runs = load_runs(find_run_dirs(cfg.runs, cfg.sweep))
    colours = palette([r.label for r in runs])
    data = {r.label: L.LayerData(r) for r in runs}
    names = Names(runs, data)
    comp = comparison(runs, cfg.comparison, untrained_of(runs))
    transferred = sections.transfer(runs, cfg.comparison)
    analyses_parts = [
        (ANALYSES[0], [sections.filters(runs), sections.feature_maps(runs, cfg.images),
                       sections.distributions(runs, colours, cfg.units)]),
        (ANALYSES[1], [sections.saliency(runs, colours, cfg.images)]),
        (ANALYSES[2], [sections.synthesis(runs, transferred)]),
        (ANALYSES[3], [sections.geometry(runs, colours)]),
        (ANALYSES[4], [concepts_section(runs, cfg.comparison)]),
        (ANALYSES[5], [sections.baseline(runs)]),
        (ANALYSES[6], [sections.sweeps(runs, colours)]),
    ]
    analyses_parts = [(a, [p for p in parts if p is not None]) for a, parts in analyses_parts]
    parts = [p for _, ps in analyses_parts for p in ps] + ([comp] if comp else [])
    metrics = None
    if cfg.comparison and (Path(cfg.comparison) / "metrics.json").is_file():
        metrics = json.loads((Path(cfg.comparison) / "metrics.json").read_text())
    found = F.findings(runs, parts, metrics, transferred)
    rows = F.headline_rows(runs, transferred)
    pages = [index_page(runs, names, colours, found, rows, comp, analyses_parts)]
    pages += [page(href, title, ps, reading=True) for (href, title), ps in analyses_parts if ps]
    matches = unit_matches(runs, cfg.comparison)
    for r in runs:
        pages.append(run_page(r, [o for o in runs if o is not r], names, data, colours))
        pages += layer_pages(r, runs, names, data, colours, matches)
    nav_runs = [{"label": r.label, "href": names.run_page(r.label)} for r in runs]
    nav_analyses = [{"title": title, "href": href} for (href, title), ps in analyses_parts if ps]
    files = render_site(cfg.name, pages, nav_runs, nav_analyses)
    files["findings.md"] = F.markdown(rows, found).encode()
    every = parts
    numbers = {
        "name": cfg.name,
        "runs": [{"label": r.label, "path": str(r.path), "model": r.model, "seed": r.card["seed"],
                  "params_total": r.card["params_total"], "metrics": r.metrics,
                  "page": names.run_page(r.label)} for r in runs],
        "differing_keys": differing_keys(runs),
        "pages": sorted(p["path"] for p in pages),
        "findings": found,
        "headline": rows,
        "missing": {p["id"]: p["missing"] for p in every if p["missing"]},
        "tables": {p["id"]: [{"caption": b["caption"], "columns": b["columns"], "rows": b["rows"]}
                             for b in p["blocks"] if b["kind"] == "table"] for p in every},
        "texts": {p["id"]: [b["text"] for b in p["blocks"] if b["kind"] == "text"] for p in every},
        # every comparison the report states, with the Comparison / Estimate behind it
        "claims": [c for p in every for c in p["claims"]],
        "aggregates": [a for p in every for a in p.get("aggregates", [])],
    }
    return files, numbers


def run(cfg: ReportStage) -> Path:
    files, numbers = render(cfg)
    final = Path(cfg.out_dir) / cfg.name
    with staged_dir(final) as tmp:
        write_site(tmp, files)
        write_json(tmp / "report.json", numbers)
    log.info("report: %s (%d pages)", final / "index.html", len(numbers["pages"]))
    return final / "index.html"
