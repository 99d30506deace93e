"""pipelines/torchvision/dvc.yaml end to end on RANDOM weights written into a temporary torch hub cache
(so probe's real loading code reads them), on a generated image folder; and the missing-weights stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_copy import copy_repo

PARAMS = "pipelines/torchvision/params.yaml"
MODELS = ["resnet18", "squeezenet1_1"]  # small files: the hub cache, run dirs and DVC cache each hold a copy
pytestmark = pytest.mark.slow


def _sh(cmd, cwd, env, check=True):
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def image_folder(root: Path, per_class: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def hub_weights(torch_home: Path, models) -> dict[str, dict]:
    """Random ImageNet-shaped weights saved where torchvision's DEFAULT weights of each model live."""
    import torchvision

    from probe.models.weights import torchvision_weights

    states = {}
    for m in models:
        url = torchvision_weights(m, "DEFAULT").url
        path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1)
        states[m] = torchvision.models.get_model(m, weights=None).state_dict()
        torch.save(states[m], path)
    return states


TINY = {
    "models": MODELS, "image_size": 64, "split": "train", "val_fraction": 0.2, "test_fraction": 0.2,
    "activations_args": "data.batch_size=8 activations.crop_channels=2 activations.images=false",
    # the cascading randomisation of every ResNet-18 layer alone takes minutes on 2 cores: off here
    "saliency_args": "saliency.batch_size=8 saliency.auc_steps=4 saliency.overlays=false saliency.randomisation=false "
                     "saliency.methods=[saliency,grad_cam] data.limit=2",
    "synthesize_args": "synthesis.channels=1 synthesis.steps=4 synthesis.class_images.enabled=false "
                       "synthesis.dream.enabled=false",
}


def test_torchvision_pipeline_on_random_hub_weights(tmp_path):
    from safetensors.torch import load_file

    torch_home = tmp_path / "torch_home"
    states = hub_weights(torch_home, MODELS)
    images = image_folder(tmp_path / "images")
    repo = copy_repo(tmp_path / "repo", PARAMS, **TINY, data_root=str(images))
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    pipe = repo / "pipelines" / "torchvision"
    out = _sh(["dvc", "repro"], pipe, env).stdout
    assert "Running stage 'weights'" in out
    assert sorted(json.loads((pipe / "checks" / "weights.json").read_text())) == sorted(MODELS)
    for m in MODELS:
        run = pipe / "artifacts" / m
        card = json.loads((run / "card.json").read_text())
        assert card["model"]["weights"] == "DEFAULT" and card["model"]["num_classes"] == 1000
        assert card["data"]["name"] == "imagefolder" and card["data"]["classes"] == ["cats", "dogs"]
        # epochs=0 keeps the hub weights as they are, ImageNet classifier included
        saved = load_file(str(run / "model.safetensors"))
        assert sorted(saved) == sorted(k for k in states[m] if states[m][k].dtype.is_floating_point or k in saved)
        for k, v in saved.items():
            assert torch.equal(v, states[m][k]), (m, k)
        for stage in ("activations", "saliency", "synthesis"):
            assert (run / stage / "metrics.json").is_file(), (m, stage)
    html = (pipe / "reports" / "torchvision" / "index.html").read_text()
    assert all(m in html for m in MODELS)
    again = _sh(["dvc", "repro"], pipe, env).stdout
    assert "Running stage" not in again


def test_missing_weights_stop_at_once_naming_every_file(tmp_path):
    from probe.models.weights import torchvision_weights

    torch_home = tmp_path / "torch_home"
    hub_weights(torch_home, ["squeezenet1_1"])  # one of three present
    repo = copy_repo(tmp_path / "repo", PARAMS, **{**TINY, "models": ["resnet18", "squeezenet1_1", "vgg11"],
                                         "data_root": str(image_folder(tmp_path / "images"))})
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    out = _sh(["dvc", "repro"], repo / "pipelines" / "torchvision", env, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "2 of 3 weights files missing" in text
    for m in ("resnet18", "vgg11"):
        name = os.path.basename(torchvision_weights(m, "DEFAULT").url)
        assert str(torch_home / "hub" / "checkpoints" / name) in text, m
    assert "squeezenet1_1-" not in text.split("missing:")[1].split(". On a machine")[0]
    assert not (repo / "pipelines" / "torchvision" / "artifacts").exists()  # no work started
