"""``probe init``: a study of one's own, outside this repository, run end to end with real git and DVC.

The slow test is issue 14's acceptance test: a user's CNN (a class in the study folder whose ``forward`` returns
``(extra, logits)``), weights trained here and saved as ``.pt``, generated PNGs in class folders, ``dvc repro``
through every stage and the report beside a second model, then a second ``dvc repro`` that runs nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import probe
from probe.pipeline import cli
from probe.pipeline.init import installed_version
from probe.pipeline.stages import STAGES

REPO = Path(probe.__file__).resolve().parents[1]
RUN_STAGES = ("train", "activations", "saliency", "synthesize", "geometry", "concepts")  # per run, in the study's dvc.yaml
ANALYSES = {s: STAGES[s].output for s in RUN_STAGES[1:]}  # stage -> folder
CLASSES = ["stripes", "disc", "square"]  # the model's own order (not the folders' sorted order)

SHAPES_NET = '''
"""A small CNN whose forward returns (features, logits), as many research models do."""
import torch.nn as nn


class ShapeNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        h = self.pool2(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x)))))).flatten(1)
        return h, self.fc(h)
'''


def _env() -> dict:
    """The venv's ``probe`` and ``dvc`` first on PATH, no DVC analytics (no network here)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def in_folder(monkeypatch):
    """``chdir`` for in-process probe commands, which put the folder they run in on ``sys.path``: both undone."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    return monkeypatch.chdir


def _init(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([str(Path(sys.executable).parent / "probe"), "init", str(folder), *args], folder.parent)


def test_init_writes_a_study_that_git_and_dvc_know(tmp_path):
    study = tmp_path / "my study"
    done = _init(study)
    assert done.returncode == 0, done.stderr
    for rel in ("conf/model/mynet.yaml", "params.yaml", "dvc.yaml", "README.md", ".gitignore", ".dvcignore",
                "nets/__init__.py", "weights/README.md", "images/README.md", ".git", ".dvc/config"):
        assert (study / rel).exists(), rel
    params = yaml.safe_load((study / "params.yaml").read_text())
    assert params["probe_version"] == installed_version()
    assert set(params["runs"]) == {"mynet", "mynet_random"}
    assert "__pycache__/" in (study / ".dvcignore").read_text().split()

    from dvc.repo import Repo

    with Repo(str(study)) as repo:  # DVC's own parser and interpolation of dvc.yaml against params.yaml
        names = {s.name for s in repo.index.stages}
        metrics = [m for ms in repo.index._metrics.values() for m in ms]
    assert names == {f"{s}@{r}" for s in RUN_STAGES for r in params["runs"]} | {"compare", "report"}
    assert sorted(metrics) == sorted(f"artifacts/{r}/{folder}/metrics.json"
                                     for r in params["runs"] for folder in ANALYSES.values())


def test_init_inside_a_git_repository_makes_a_dvc_subrepo(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done = _init(tmp_path / "study")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "study" / ".git").exists()  # no repository nested in the user's own
    assert (tmp_path / "study" / ".dvc").is_dir()
    assert "dvc init --subdir" in done.stdout


def test_study_commands_compose_against_probes_configs(tmp_path, in_folder, capsys):
    """Every command of the study's dvc.yaml, as DVC resolves it, composes (keys that exist, values of the
    schema's types, the study's conf/model/ found): a renamed key in probe would fail here, not in a user's study."""
    study = tmp_path / "study"
    assert _init(study, "--model", "leafnet").returncode == 0
    from dvc.repo import Repo

    with Repo(str(study)) as repo:
        cmds = {s.name: s.cmd for s in repo.index.stages}
    assert "train@leafnet_random" in cmds
    in_folder(study)
    for name, cmd in cmds.items():
        words = shlex.split(cmd)
        assert words[:3] == ["probe", "--expect-version", installed_version()], name
        assert cli.main(words[1:] + ["--cfg", "job"]) == 0, (name, capsys.readouterr().err)
    shown = yaml.safe_load(capsys.readouterr().out.split("\n\n")[0])
    assert shown["model"]["_target_"] == "nets.leafnet.Net"  # conf/model/leafnet.yaml of the study


def test_init_refuses_a_folder_that_is_not_empty(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "notes.txt").write_text("mine")
    done = _init(study)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not empty" in done.stderr and "notes.txt" in done.stderr
    assert sorted(p.name for p in study.iterdir()) == ["notes.txt"]
    bad = _init(tmp_path / "other", "--model", "my.net", "--no-git")
    assert bad.returncode == 2 and "--model" in bad.stderr and not (tmp_path / "other").exists()


def test_study_conf_comes_after_probes_own_configs(tmp_path, in_folder, capsys):
    """The current folder's conf/ adds configs (data=small) but does not replace probe's (data=digits)."""
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "small.yaml").write_text("name: digits\nimage_size: 24\n")
    (tmp_path / "conf" / "data" / "digits.yaml").write_text("name: digits\nimage_size: 12\n")
    in_folder(tmp_path)
    for choice, size in (("small", 24), ("digits", 32)):
        assert cli.main(["train", f"data={choice}", "--cfg", "job"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["data"]["image_size"] == size, choice
    in_folder(tmp_path / "conf")  # no conf/ here: probe's own configs only
    assert cli.main(["train", "data=small", "--cfg", "job"]) == 2
    assert "data: 'small' is not allowed" in capsys.readouterr().err


def test_expect_version_refuses_another_probe_and_writes_nothing(tmp_path, in_folder, capsys):
    in_folder(tmp_path)
    assert cli.main(["--expect-version", "0.0.0", "train", f"run_dir={tmp_path / 'run'}", "train.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probe_version" in err and installed_version() in err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"probe {installed_version()}"


# --- this repository, laid out as a study ----------------------------------------------------------------------


def test_side_pipelines_stay_out_of_the_roots_metrics_and_plots(tmp_path):
    """pipelines/* are DVC projects of their own: the root's `dvc metrics show`/`dvc plots show` read no file of
    theirs (in a fresh copy only the root's own outputs, made by `dvc repro`, can be missing), nor the study
    template's dvc.yaml; each side pipeline still parses on its own."""
    from repo_copy import copy_repo

    copy = copy_repo(tmp_path / "repo")
    declared = {}
    for view in (["metrics", "show", "--json"], ["plots", "show", "--json", "-o", str(tmp_path / "plots")]):
        shown = _run(["dvc", *view], copy)
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        if "plots" in view:
            errors = [e["name"] for e in data.get("errors", [])]
        else:
            declared = data[""]["data"]
            errors = [f for f, result in declared.items() if "error" in result]
        assert all(f.startswith(("artifacts/", "comparisons/")) for f in errors), errors
    runs = yaml.safe_load((REPO / "params.yaml").read_text())["runs"]
    assert set(declared) == {"comparisons/default/metrics.json"} | {  # every run's, and only these
        f"artifacts/{r}/{sub}metrics.json" for r in runs for sub in ["", *(f"{folder}/" for folder in ANALYSES.values())]}
    for side in ("cifar10", "torchvision"):
        listed = _run(["dvc", "stage", "list"], copy / "pipelines" / side)
        assert listed.returncode == 0 and "report" in listed.stdout, listed.stderr
        params = yaml.safe_load((REPO / "pipelines" / side / "params.yaml").read_text())
        assert params["probe_version"] == installed_version(), side  # else every stage would refuse to run


def test_library_dependency_ignores_python_and_numba_caches(tmp_path):
    """The root stages depend on probe/ as a whole: importing it (Python's and numba's caches in __pycache__/)
    leaves its hash alone, an edited module changes it."""
    from dvc.repo import Repo
    from repo_copy import copy_repo

    copy = copy_repo(tmp_path / "repo")

    def library_hash() -> str:
        with Repo(str(copy)) as repo:
            stages = [s for s in repo.index.stages if s.name in ("train@lenet5", "geometry@vgg_small", "report")]
            assert len(stages) == 3 and all({"probe", "conf"} <= {d.def_path for d in s.deps} for s in stages)
            return next(d for d in stages[0].deps if d.def_path == "probe").get_hash().value

    before = library_hash()
    for cache in ("probe/__pycache__/cli.cpython-311.pyc", "probe/activations/__pycache__/kernel._reduce-1.py311.nbi"):
        (copy / cache).parent.mkdir(parents=True, exist_ok=True)
        (copy / cache).write_bytes(b"\0compiled")
    assert library_hash() == before
    with open(copy / "probe" / "data.py", "a") as f:
        f.write("\n# edited\n")
    assert library_hash() != before


def test_repository_experiments_compose(in_folder, capsys):
    """conf/experiment/ of this repository, found through the same search path as a study's conf/."""
    in_folder(REPO)
    assert cli.main(["train", "+experiment=dynamics", "--cfg", "job"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["train"]["snapshot_epochs"] == [0, 1, 5, 20] and job["run_dir"] == "runs/dynamics"
    assert cli.main(["train", "+experiment=seeds", "--cfg", "hydra"]) == 0
    sweep = yaml.safe_load(capsys.readouterr().out)["hydra"]["sweeper"]["params"]
    assert sweep == {"model": "lenet5,vgg_small,resnet_small", "seed": "0,1,2"}


# --- the study end to end -------------------------------------------------------------------------------------


def _shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A coloured disc, square or stripe pattern on faint noise, ``(size, size, 3)`` uint8."""
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(10, size - 10, 2)
    r = rng.uniform(5, 9)
    if kind == "disc":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    elif kind == "square":
        mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
    else:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 8)
        mask = ((xx * np.cos(angle) + yy * np.sin(angle)) % period) < period / 2
    img = 0.1 * rng.random((size, size, 3)) + mask[..., None] * rng.uniform(0.5, 1.0, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_images(root: Path, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """PNGs in ``root/<class>/``; returns the images ``(N, 32, 32, 3)`` and labels in the model's class order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for kind in sorted(CLASSES):  # folder order differs from the model's class order on purpose
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            img = _shape_image(kind, rng)
            Image.fromarray(img).save(root / kind / f"{i:02d}.png")
            images.append(img)
            labels.append(CLASSES.index(kind))
    return np.stack(images), np.asarray(labels)


def _normalised(images: np.ndarray):
    import torch

    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return (x - 0.5) / 0.25


def _train_shape_net(study: Path, images: np.ndarray, labels: np.ndarray):
    """ShapeNet from the study's own nets/shapes.py, trained a few full-batch steps; saved as weights/shapes.pt."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("study_shapes", study / "nets" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.ShapeNet(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = _normalised(images), torch.tensor(labels)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x)[1], y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x)[1].argmax(1) == y).float().mean().item()
    assert accuracy > 0.6  # trained: well above chance (1/3)
    torch.save(model.state_dict(), study / "weights" / "shapes.pt")
    return model


def _fill_in_study(study: Path) -> None:
    """What a user does after `probe init`: the model config, and settings that keep the analyses short."""
    (study / "conf" / "model" / "shapes.yaml").write_text(yaml.safe_dump({
        "_target_": "nets.shapes.ShapeNet",
        "kwargs": {"width": 8},
        "weights": "weights/shapes.pt",
        "input": {"channels": 3, "size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "output": 1,
        "classes": CLASSES,
    }, sort_keys=False))
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["saliency"] = {"ig_steps": 4, "smoothgrad_samples": 2, "random_orders": 2}
    params["synthesis"] = {"steps": 8, "class_images": {"steps": 8}, "dream": {"enabled": False}}
    params["geometry"] = {"erf": {"noise_images": 2}}
    params["concepts"] = {"k": 4, "overrides": "concepts.n_designs=8"}
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_study_of_ones_own_model_runs_end_to_end(tmp_path):
    import pandas as pd
    import torch

    assert REPO not in tmp_path.resolve().parents  # outside this repository
    study = tmp_path / "study"
    made = _init(study, "--model", "shapes")
    assert made.returncode == 0, made.stderr
    (study / "nets" / "shapes.py").write_text(SHAPES_NET)
    images, labels = _write_images(study / "images")
    model = _train_shape_net(study, images, labels)
    _fill_in_study(study)

    first = _run(["dvc", "repro"], study, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for run in ("shapes", "shapes_random"):
        for folder in ANALYSES.values():
            assert (study / "artifacts" / run / folder / "metrics.json").is_file(), (run, folder)

    card = json.loads((study / "artifacts" / "shapes" / "card.json").read_text())
    assert card["params_total"] == sum(p.numel() for p in model.parameters())
    assert card["data"]["classes"] == CLASSES  # the model's order, not the folders'
    # activations of every image (split: all), with the .pt weights and the config's normalisation: conv1's
    # per-channel mean and count against a forward pass here
    stats = pd.read_parquet(study / "artifacts" / "shapes" / "activations" / "stats.parquet")
    conv1 = stats[stats["layer"] == "conv1"].sort_values("channel")
    with torch.no_grad():
        out = model.conv1(_normalised(images)).double()
    assert conv1["count"].tolist() == [len(images) * 32 * 32] * 8
    np.testing.assert_allclose(conv1["mean"].to_numpy(), out.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    assert set(stats["layer"]) <= {name for name, _ in model.named_modules() if name}  # the user's layer names

    report = json.loads((study / "reports" / "study" / "report.json").read_text())
    assert sorted(r["label"] for r in report["runs"]) == ["shapes", "shapes_random"]  # side by side
    assert all(set(ANALYSES.values()) <= set(r["metrics"]) for r in report["runs"])
    assert "shapes_random" in (study / "reports" / "study" / "index.html").read_text()
    compared = json.loads((study / "comparisons" / "study" / "metrics.json").read_text())  # the two side by side
    assert set(compared["weights_sha256"]) == {"shapes", "shapes_random"} and "shapes~shapes_random" in compared["cka_last_conv"]
    assert "comparison" in report["tables"] and not report["missing"].get("comparison")

    second = _run(["dvc", "repro"], study)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout and "up to date" in second.stdout, second.stdout[-2000:]
    shown = _run(["dvc", "metrics", "show", "--json"], study)
    assert shown.returncode == 0 and "failed to load" not in shown.stderr, shown.stderr
    files = json.loads(shown.stdout)[""]["data"]
    assert {f for f, result in files.items() if "error" not in result} == {  # every run's metrics are declared
        f"artifacts/{run}/{sub}metrics.json" for run in ("shapes", "shapes_random")
        for sub in ["", *(f"{folder}/" for folder in ANALYSES.values())]}

    # the README's `dvc exp show` pattern: the kept columns name their run and stage
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study"]):
        assert _run(cmd, study).returncode == 0
    readme = (study / "README.md").read_text()
    keep = readme.split("--keep '")[1].split("'")[0]
    table = _run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", keep], study)
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split(",")
    assert {"saliency.ig_steps", "saliency.random_orders", "artifacts/shapes/metrics.json:test_acc",
            "artifacts/shapes_random/activations/metrics.json:dead_fraction_mean"} <= set(header), header
    assert len(header) < 20, header
