"""pipelines/cifar10/dvc.yaml parses and plans every stage (no test may download CIFAR-10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from repo_copy import copy_repo

ROOT = Path(__file__).resolve().parents[1]


def test_cifar10_pipeline_parses_and_plans(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    pipe = repo / "pipelines" / "cifar10"
    out = subprocess.run(["dvc", "stage", "list"], cwd=pipe, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    runs = yaml.safe_load((ROOT / "pipelines" / "cifar10" / "params.yaml").read_text())["runs"]
    stages = {line.split()[0].split(":")[-1] for line in out.stdout.splitlines() if line.strip()}
    expected = {"download", "report"} | {f"{s}@{r}" for s in ("train", "activations", "saliency", "synthesize")
                                         for r in runs}
    assert stages == expected
    # the graph: download feeds every training run, every run feeds the report
    dag = subprocess.run(["dvc", "dag", "--dot", "report"], cwd=pipe, env=env,
                         capture_output=True, text=True, timeout=300)
    assert dag.returncode == 0, dag.stderr
    for r in runs:
        assert f'"download" -> "train@{r}"' in dag.stdout, dag.stdout
        assert f'"synthesize@{r}" -> "report"' in dag.stdout
    # every run trains on CIFAR-10 from the downloaded folder, never downloading again
    text = (ROOT / "pipelines" / "cifar10" / "dvc.yaml").read_text()
    assert "data=cifar10" in text and "data.download=false" in text
