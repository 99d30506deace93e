"""A fresh git repository holding this one's files, where the pipeline tests and benchmarks run the
real ``dvc repro`` without touching the working copy (benchmarks/run.py imports it too)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("artifacts/", "reports/", "comparisons/", "pipelines/torchvision/artifacts", "pipelines/cifar10/artifacts")

# params.yaml's runs for a pipeline that takes a minute: a trained and an untrained tiny net
TINY_RUNS = {"tiny": {"model": "tiny_cnn", "epochs": 1, "seed": 0, "snapshots": "[]", "concepts": "conv2"},
             "tiny_random": {"model": "tiny_cnn", "epochs": 0, "seed": 0, "snapshots": "[]", "concepts": "conv2"}}
TINY_CONCEPTS = {"k": 4}  # tiny_cnn's conv2 has 8 channels


def copy_repo(dst: Path, params_file: str = "params.yaml", **params) -> Path:
    """Copy the working tree's files (tracked and untracked, not ignored; not pipeline outputs) into
    ``dst``, set the top-level ``params`` in ``params_file``, and commit them in a new git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(OUTPUTS):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    p = dst / params_file
    p.write_text(yaml.safe_dump({**yaml.safe_load(p.read_text()), **params}))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=probe", "-c", "user.email=probe@localhost", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, capture_output=True, text=True, check=True)
    return dst


def report_pages(folder: Path) -> dict[str, str]:
    """Every HTML page of a report folder: relative path -> text."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(Path(folder).rglob("*.html"))}


def report_files(folder: Path) -> dict[str, bytes]:
    """Every file of a report folder: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
