"""``probe report``: any set of run dirs or a Hydra sweep -> reports/<name>/index.html + report.json."""

from __future__ import annotations

import logging
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from probe.pipeline.report import sections
from probe.pipeline.report.comparison import comparison
from probe.pipeline.report.claims import FILTERS
from probe.pipeline.report.collect import differing_keys, load_runs
from probe.pipeline.report.config import ReportStage
from probe.pipeline.report.figures import palette
from probe.pipeline.rundir import find_run_dirs, staged_dir
from probe.files import write_bytes, write_json

log = logging.getLogger(__name__)


def untrained_of(runs):
    """A run -> the untrained run of its model on the page (None where there is none)."""
    pairs = dict((t.label, u) for t, u in sections.baseline_pairs(runs))
    return lambda r: pairs.get(r.label)


def render(cfg: ReportStage) -> tuple[str, dict]:
    """The page and its numbers for the runs ``cfg`` names."""
    runs = load_runs(find_run_dirs(cfg.runs, cfg.sweep))
    colours = palette([r.label for r in runs])
    parts = [
        sections.overview(runs),
        sections.architecture(runs),
        sections.filters(runs),
        sections.feature_maps(runs, cfg.images),
        sections.distributions(runs, colours, cfg.units),
        sections.saliency(runs, colours, cfg.images),
        sections.synthesis(runs),
        sections.geometry(runs, colours),
        sections.baseline(runs),
        comparison(runs, cfg.comparison, untrained_of(runs)),
        sections.sweeps(runs, colours),
    ]
    parts = [p for p in parts if p is not None]
    env = Environment(loader=PackageLoader("probe.pipeline.report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    html = env.get_template("report.html.j2").render(name=cfg.name, runs=[r.label for r in runs], sections=parts)
    numbers = {
        "name": cfg.name,
        "runs": [{"label": r.label, "path": str(r.path), "model": r.model, "seed": r.card["seed"],
                  "params_total": r.card["params_total"], "metrics": r.metrics} for r in runs],
        "differing_keys": differing_keys(runs),
        "missing": {p["id"]: p["missing"] for p in parts if p["missing"]},
        "tables": {p["id"]: [{"caption": b["caption"], "columns": b["columns"], "rows": b["rows"]}
                             for b in p["blocks"] if b["kind"] == "table"] for p in parts},
        "texts": {p["id"]: [b["text"] for b in p["blocks"] if b["kind"] == "text"] for p in parts},
        # every comparison the page states, with the Comparison / Estimate behind it
        "claims": [c for p in parts for c in p["claims"]],
        "aggregates": [a for p in parts for a in p.get("aggregates", [])],
    }
    return html, numbers


def run(cfg: ReportStage) -> Path:
    html, numbers = render(cfg)
    final = Path(cfg.out_dir) / cfg.name
    with staged_dir(final) as tmp:
        write_bytes(tmp / "index.html", html.encode())
        write_json(tmp / "report.json", numbers)
    log.info("report: %s", final / "index.html")
    return final / "index.html"
