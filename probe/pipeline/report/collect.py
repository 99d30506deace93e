"""Find run dirs and read what each stage left in them, tolerating what is missing."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from probe.pipeline.rundir import read_card, run_labels, stale
from probe.pipeline.stages import result_folders, writer


def hydra_value(path: Path | str) -> str:
    """``path`` as a Hydra override value: plain where it is only letters, digits and ``_./-``, else a quoted
    string (quotes escaped, and the backslashes right before a quote or the end doubled). A sweep's run dirs are
    named after their overrides (``model=lenet5,seed=0``), which Hydra reads as syntax unless quoted."""
    path = str(path)
    if re.fullmatch(r"[A-Za-z0-9_./-]+", path):
        return path
    body = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', path)
    return '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body) + '"'


def stage_command(folder: str, run: Path) -> str:
    """The shell command that writes result ``folder`` (``activations``, ``synthesis`` ...) for ``run``, quoted so
    that it can be pasted (the shell needs the whole override quoted)."""
    return f"probe {writer(folder).name} {shlex.quote('run=' + hydra_value(run))}"


def compare_command(runs: list[Path], out: Path) -> str:
    """The shell command that writes the comparison folder ``out`` for ``runs``, quoted like :func:`stage_command`."""
    listed = ",".join(hydra_value(r) for r in runs)
    return (f"probe compare {shlex.quote(f'runs=[{listed}]')} {shlex.quote('name=' + hydra_value(out.name))} "
            f"{shlex.quote('out_dir=' + hydra_value(out.parent))}")


@dataclass
class RunData:
    label: str  # unique name shown in the report
    path: Path
    card: dict
    config: dict  # the flattened resolved config
    metrics: dict = field(default_factory=dict)  # stage folder ("train", "activations", ...) -> metrics.json
    # stage folder -> why it is not shown: computed from weights other than the run's (rundir.stale)
    stale: dict = field(default_factory=dict)

    def has(self, stage: str) -> bool:
        return stage not in self.stale and (self.path / stage / "metrics.json").is_file()

    def _path(self, stage: str, name: str) -> Path | None:
        path = self.path / stage / name
        return path if stage not in self.stale and path.is_file() else None

    def table(self, stage: str, name: str) -> pd.DataFrame | None:
        path = self._path(stage, f"{name}.parquet")
        return pd.read_parquet(path) if path else None

    def arrays(self, stage: str, name: str):
        path = self._path(stage, f"{name}.npz")
        return np.load(path) if path else None

    def file(self, stage: str, name: str) -> Path | None:
        return self._path(stage, name)

    @property
    def model(self) -> str:
        return self.card["model"]["name"]

    def layer_order(self) -> dict[str, int]:
        """Layer name -> depth (call order in the card's layer table)."""
        return {row["name"]: i for i, row in enumerate(self.card["layers"])}


BRANCH = ("shortcut", "downsample")  # residual branches: beside the main path, not deeper than it


def relative_depth(layers: list[str]) -> dict[str, float]:
    """Layers (in call order) -> position among the main-path ones, 0 (first) to 1 (last): how layers of different
    models are aligned. Shortcut / downsample branches are not depth and get none."""
    main = [n for n in layers if not any(b in n for b in BRANCH)]
    return {n: (i / (len(main) - 1) if len(main) > 1 else 0.0) for i, n in enumerate(main)}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_runs(paths: list[Path]) -> list[RunData]:
    runs = []
    for p in paths:
        card = read_card(p)  # raises RunDirError naming the folder
        cfg = p / "config.yaml"
        config = flatten(OmegaConf.to_container(OmegaConf.load(cfg))) if cfg.is_file() else {}
        config.pop("run_dir", None)
        metrics = {"train": card["metrics"]}
        stale_folders = {f: why for f in result_folders() if (why := stale(p, f))}
        for folder in result_folders():
            m = p / folder / "metrics.json"
            if m.is_file() and folder not in stale_folders:
                metrics[folder] = json.loads(m.read_text())
        runs.append(RunData(card["run_name"], p, card, config, metrics, stale_folders))
    for r, label in zip(runs, run_labels([r.path for r in runs])):
        r.label = label
    return runs


def differing_keys(runs: list[RunData]) -> list[str]:
    """Config keys whose values are not the same in every run."""
    keys = sorted(set().union(*(r.config for r in runs)))
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1]


# Keys that say where or how a run was computed, not what: never a reason to keep runs apart.
RUNTIME_KEYS = frozenset({"run_dir", "device", "threads", "progress", "train.snapshot_epochs", "data.root", "data.download", "data.num_workers"})
# Keys a sweep repeats a configuration over: the aggregate is over these.
SEED_KEYS = frozenset({"seed"})


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def group_key(run: RunData) -> tuple:
    """What makes two runs the same experiment: the resolved config minus the seed and runtime keys, with
    the model, dataset and epochs from the card always part of it (so a run without config.yaml, or a
    config that lost them, still never aggregates across them)."""
    cfg = {k: v for k, v in run.config.items() if k not in RUNTIME_KEYS | SEED_KEYS and not k.startswith("hydra.")}
    card = run.card
    cfg["card.model"] = card["model"].get("name")
    cfg["card.weights"] = card["model"].get("weights")
    cfg["card.dataset"] = card["data"].get("name")
    cfg["card.image_size"] = card["data"].get("image_size")
    cfg["card.epochs"] = card.get("train", {}).get("epochs", card.get("metrics", {}).get("epochs"))
    return tuple(sorted((k, _canon(v)) for k, v in cfg.items()))


def seed_groups(runs: list[RunData]) -> list[list[RunData]]:
    """Runs that share every config key but the seed (and runtime keys), in page order: a group of more
    than one run is a sweep over seeds of one experiment. Runs with a different model, dataset, number of
    epochs, learning rate, ... are in different groups."""
    groups: dict[tuple, list[RunData]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    return list(groups.values())


def headline(run: RunData) -> dict[str, float]:
    """Every numeric leaf of every stage's metrics.json as ``stage.path.to.key``; a Comparison or Estimate
    counts as its main number (effect or value), its bounds and p-values are not headline numbers."""
    from probe.pipeline.report.claims import is_comparison, is_estimate, main_number

    out: dict[str, float] = {}

    def walk(prefix: str, v) -> None:
        if is_comparison(v) or is_estimate(v):
            x = main_number(v)
            if x is not None:
                out[prefix] = x
        elif isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}.{k}", w)
        else:
            x = main_number(v)
            if x is not None:
                out[prefix] = x

    for stage, m in run.metrics.items():
        walk(stage, m)
    return out
