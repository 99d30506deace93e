"""The report's comparison section: how the runs' representations differ (from ``probe compare``'s folder).

- the CKA heatmap of every layer of every run against every other (``cka.png``);
- **the seed band**: for runs that differ only in seed, the CKA of each layer with the same layer of the other
  seed ("as different as two trainings of the same net"), beside the CKA of the trained layer with the same
  layer of the untrained run of that model;
- **cross-model sentences**: for two trained runs of different models, the CKA of their first and of their last
  conv layers, each compared with the seed band of either model at that layer (difference, interval and p from
  :func:`probe.uncertainty.se_difference`; Holm over the family), so a sentence says "closer than two seeds of
  lenet5 are" only where that is distinguishable;
- units matched across seeds (Li et al. 2016) per layer, as k of n units with Wilson intervals;
- each layer's CKA with its final state over the training snapshots.

Every CKA is written with its t interval from the minibatch standard error (``batches - 1`` degrees of freedom).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from probe.pipeline.report.claims import claim, verdict
from probe.pipeline.report.collect import RunData, compare_command, seed_groups
from probe.pipeline.report.figures import png_uri
from probe.pipeline.report.sections import _table, untrained
from probe.pipeline.rundir import weights_digest
from probe.uncertainty import adjust, proportion_interval, se_difference, se_interval

THRESHOLDS = (0.5, 0.8)


class CKATable:
    """Look-ups in ``cka.parquet`` (one row per unordered pair of (run, layer))."""

    def __init__(self, df: pd.DataFrame):
        self.rows = {}
        for r in df.itertuples(index=False):
            self.rows[(r.run_a, r.layer_a, r.run_b, r.layer_b)] = r
            self.rows[(r.run_b, r.layer_b, r.run_a, r.layer_a)] = r

    def get(self, ra: str, la: str, rb: str, lb: str):
        return self.rows.get((ra, la, rb, lb))

    @staticmethod
    def estimate(row) -> dict:
        return se_interval(float(row.cka), float(row.se), int(row.batches) - 1).to_dict()


def convs(r: RunData) -> list[str]:
    return [x["name"] for x in r.card["layers"] if x["type"] == "Conv2d"]


def comparison(runs: list[RunData], folder: str | None, untrained_of) -> dict | None:
    """The section, or None when the report was not given a comparison folder."""
    if folder is None:
        return None
    folder = Path(folder)
    s = {"id": "comparison", "title": "How the networks differ: representational similarity",
         "intro": "Linear CKA (Kornblith et al. 2019) between the layers of every pair of runs on the same images, "
                  "estimated over minibatches with the unbiased HSIC (Nguyen, Raghu & Kornblith 2021): 1 means the "
                  "same representation up to rotation and scale, values near 0 unrelated ones. Each CKA carries its "
                  "95% t interval from the spread over minibatches.",
         "blocks": [], "missing": [], "claims": []}
    if not (folder / "metrics.json").is_file():
        s["missing"].append({"run": "all runs", "command": compare_command([r.path for r in runs], folder), "why": f"{folder} has no comparison"})
        return s
    metrics = json.loads((folder / "metrics.json").read_text())
    recorded = metrics.get("weights_sha256", {})
    have = []
    for r in runs:
        if r.label not in recorded:
            s["missing"].append({"run": r.label, "command": compare_command([r.path for r in runs], folder), "why": f"not in {folder}"})
        elif recorded[r.label] != weights_digest(r.path):
            s["missing"].append({"run": r.label, "command": compare_command([r.path for r in runs], folder),
                                 "why": f"{folder} was computed from other weights of this run"})
        else:
            have.append(r)
    cka = CKATable(pd.read_parquet(folder / "cka.parquet"))
    s["blocks"].append({"kind": "text", "text": f"{metrics['images']} images in {metrics['batches']} minibatches of "
                        f"{metrics['batch_size']} ({metrics['images_unused']} left over, not used)."})
    if (folder / "cka.png").is_file():
        s["blocks"].append({"kind": "figure", "caption": "CKA of every layer of every run (rows) against every layer "
                            "of every run (columns); runs in blocks, layers in model order",
                            "uri": png_uri((folder / "cka.png").read_bytes())})
    band = _seed_band(s, have, cka, untrained_of)
    _across_models(s, have, cka, band)
    _units(s, folder, have)
    _dynamics(s, folder, have)
    return s


def _seed_band(s: dict, runs: list[RunData], cka: CKATable, untrained_of) -> dict:
    """``{(run label, layer): (row of the seed pair)}`` for every run with a seed partner; adds the table."""
    band, rows = {}, []
    for group in seed_groups(runs):
        for a, b in combinations(group, 2):
            base = untrained_of(a)
            for layer in [x["name"] for x in a.card["layers"] if x["type"] in ("Conv2d", "Linear")]:
                row = cka.get(a.label, layer, b.label, layer)
                if row is None:
                    continue
                band.setdefault((a.label, layer), row)
                band.setdefault((b.label, layer), row)
                rnd = cka.get(a.label, layer, base.label, layer) if base is not None else None
                rows.append({"layer": layer, "seeds": f"{a.label} vs {b.label}",
                             "CKA between seeds [95% CI], n batches": CKATable.estimate(row),
                             "CKA trained vs untrained": CKATable.estimate(rnd) if rnd is not None else None,
                             "untrained run": base.label if base is not None else ""})
    if rows:
        s["blocks"].append({"kind": "text", "text": "The seed band: how similar two trainings of the same network are, "
                            "layer by layer. It is the yardstick for every difference between models below."})
        s["blocks"].append(_table("CKA of each layer with the same layer of another seed, and with the untrained run",
                                  pd.DataFrame(rows)))
    else:
        s["blocks"].append({"kind": "text", "text": "No two runs here differ only in seed, so there is no seed band: "
                            "train a second seed (e.g. `probe train -m seed=0,1 ...`) and compare again to know how "
                            "different two trainings of one network are."})
    return band


def _across_models(s: dict, runs: list[RunData], cka: CKATable, band: dict) -> None:
    trained = [r for r in runs if not untrained(r)]
    tests = []  # (a, la, b, lb, which, est row, against label, band row)
    for a, b in combinations(trained, 2):
        if a.model == b.model:
            continue
        ca, cb = convs(a), convs(b)
        if not ca or not cb:
            continue
        for which, pos in (("first conv", 0), ("last conv", -1)):
            row = cka.get(a.label, ca[pos], b.label, cb[pos])
            if row is None:
                continue
            for r, layer in ((a, ca[pos]), (b, cb[pos])):
                if (r.label, layer) in band:
                    tests.append((a, ca[pos], b, cb[pos], which, row, r, layer, band[(r.label, layer)]))
    if not tests:
        return
    comps = adjust([se_difference(float(t[5].cka), float(t[5].se), float(t[8].cka), float(t[8].se),
                                  int(t[5].batches) - 1, int(t[8].batches) - 1) for t in tests])
    rows, words_of = [], []
    for (a, la, b, lb, which, row, r, layer, seed_row), c in zip(tests, comps):
        d = c.to_dict()
        words = verdict(d, f"closer to each other than two seeds of {r.label} are",
                        f"further apart than two seeds of {r.label} are",
                        f"not distinguishable from two seeds of {r.label}")
        words_of.append(verdict(d, "closer", "further", "neither"))
        rows.append({"layers": f"{a.label}/{la} vs {b.label}/{lb}", "CKA": CKATable.estimate(row),
                     "seed band": f"{r.label}/{layer}", "seed CKA": CKATable.estimate(seed_row),
                     "difference [95% CI], p": d, "verdict": words})
        s["claims"].append(claim("comparison", f"{a.label} vs {b.label}", f"{which} ({la} vs {lb}): CKA against the "
                                 f"seed band of {r.label}", words, d))
    s["blocks"].append({"kind": "text", "text": (
        f"Across models, {len(tests)} comparisons of corresponding conv layers (first with first, last with last) "
        f"against the seed band: {words_of.count('closer')} closer to each other than two seeds are, "
        f"{words_of.count('further')} further apart, {words_of.count('neither')} not distinguishable from it.")})
    s["blocks"].append(_table("Across models: the CKA of corresponding conv layers against the seed band (difference: "
                              "t test on the two standard errors, combined as if independent; p Holm-adjusted over "
                              "the table)", pd.DataFrame(rows), wrap=("verdict",)))


def _units(s: dict, folder: Path, runs: list[RunData]) -> None:
    path = folder / "units.parquet"
    if not path.is_file():
        return
    units = pd.read_parquet(path)
    labels = {r.label for r in runs}
    units = units[units.run_a.isin(labels) & units.run_b.isin(labels)]
    if units.empty:
        return
    rows = []
    for (ra, rb, layer), g in units.groupby(["run_a", "run_b", "layer"], sort=False):
        row = {"runs": f"{ra} vs {rb}", "layer": layer}
        for kind, name in (("semi", "best partner"), ("one_to_one", "one-to-one")):
            c = g[g.matching == kind]["corr"].to_numpy(float)
            for t in THRESHOLDS:
                row[f"{name} > {t}"] = proportion_interval(int(np.sum(np.nan_to_num(c, nan=-2) > t)), len(c)).to_dict()
        rows.append(row)
    s["blocks"].append({"kind": "text", "text": "Units across runs of one architecture (Li et al. 2016, \"Convergent "
                        "learning\"): each unit's most correlated unit in the other run over all images and positions "
                        "(best partner; several units may share one), and the one-to-one matching that maximises the "
                        "total correlation; the share of units matched above 0.5 and 0.8, with Wilson intervals."})
    s["blocks"].append(_table("Units matched across runs: share of units with a partner above the threshold",
                              pd.DataFrame(rows)))


def _dynamics(s: dict, folder: Path, runs: list[RunData]) -> None:
    path = folder / "dynamics.parquet"
    if not path.is_file():
        return
    dyn = pd.read_parquet(path)
    dyn = dyn[dyn.run.isin({r.label for r in runs})]
    if dyn.empty:
        return
    import matplotlib.pyplot as plt

    from probe.pipeline.report.figures import figure_uri

    for run, g in dyn.groupby("run", sort=False):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for layer, h in g.groupby("layer", sort=False):
            h = h.sort_values("epoch")
            ax.errorbar(h.epoch, h.cka, yerr=1.96 * h.se, marker="o", ms=3, capsize=2, label=layer)
        ax.set_xlabel("epoch of the snapshot")
        ax.set_ylabel("CKA with the final weights")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        s["blocks"].append({"kind": "figure", "caption": f"{run}: each layer's CKA with its final state over training "
                            "(bars: ±1.96 SE); layers that converge first reach 1 first (Raghu et al. 2017)",
                            "uri": figure_uri(fig)})
