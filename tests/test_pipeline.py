"""The real DVC pipeline, end to end, in a temporary copy of the repository with a tiny params.yaml."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from repo_copy import TINY_CONCEPTS, TINY_RUNS, copy_repo

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository holding the files of this one, with two tiny runs in params.yaml."""
    return copy_repo(tmp_path_factory.mktemp("repo"), runs=TINY_RUNS, concepts=TINY_CONCEPTS)


def test_dvc_repro_runs_every_stage_then_nothing(repo):
    out = _sh(["dvc", "repro"], repo)
    assert "Running stage 'train@tiny'" in out and "Running stage 'report'" in out
    for run in ("tiny", "tiny_random"):
        d = repo / "artifacts" / run
        assert json.loads((d / "card.json").read_text())["run_name"] == run
        for stage in ("activations", "saliency", "synthesis", "geometry", "concepts"):
            assert (d / stage / "metrics.json").is_file(), (run, stage)
    assert "tiny_random" in (repo / "reports" / "default" / "index.html").read_text()
    again = _sh(["dvc", "repro"], repo)
    assert "Running stage" not in again
    assert "up to date" in again.lower()


def test_a_fresh_clone_reproduces_the_committed_lock_exactly(repo, tmp_path):
    """Issue 15, item 12: what DVC hashes holds no path, clock, version or thread count of the machine, so
    `dvc repro` in a fresh clone (another folder, another thread limit) leaves `git status` clean."""
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "lock"], repo)
    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    out = _sh(["env", "OMP_NUM_THREADS=2", "dvc", "repro"], clone)
    assert "Running stage 'train@tiny'" in out  # a fresh clone has no outputs: every stage ran
    assert _sh(["git", "status", "--porcelain"], clone) == ""


def test_dvc_experiment_changes_a_param_and_shows_metrics(repo):
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "lock"], repo)
    _sh(["dvc", "exp", "run", "-S", "runs.tiny.epochs=2"], repo)
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], repo))

    def records(node):  # every dict in the output that holds a revision's params and metrics
        if isinstance(node, dict):
            if isinstance(node.get("params"), dict) and isinstance(node.get("metrics"), dict):
                yield node
            for value in node.values():
                yield from records(value)
        elif isinstance(node, list):
            for value in node:
                yield from records(value)

    def epochs(rec):
        return rec["params"].get("params.yaml", {}).get("data", {}).get("runs", {}).get("tiny", {}).get("epochs")

    # `dvc exp run` also leaves its result in the workspace: look at the recorded experiment
    changed = [r for r in records(shown) if epochs(r) == 2 and r.get("rev") != "workspace"]
    assert len(changed) == 1, [(r.get("rev"), epochs(r)) for r in records(shown)]
    metrics = changed[0]["metrics"]["artifacts/tiny/metrics.json"]["data"]
    assert metrics["epochs"] == 2 and 0 <= metrics["test_acc"] <= 1
