"""Bring any nn.Module: a model of one's own (by `_target_`, `pkg.mod:fn`, an entry point), timm and
torchvision by name, output selection, weights, and the errors and trust rules around them."""

import copy
import json
import socket
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from probe.errors import ConfigError, RunDirError, WeightsError
from probe.models import build, list_models
from probe.pipeline.cli import main

LEAVES = '''
import torch
import torch.nn as nn


class LeafNet(nn.Module):
    """forward returns (features, logits)."""

    def __init__(self, width=4, num_classes=3, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        features = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return features, self.fc(torch.flatten(self.gap(features), 1))


class DictNet(LeafNet):
    def forward(self, x):
        features, logits = super().forward(x)
        return {"aux": features, "logits": logits}


def make_net(width=4, num_classes=3):
    return LeafNet(width, num_classes)


def raises(**kwargs):
    raise RuntimeError("boom in the factory")


def not_a_module(**kwargs):
    return 42


VALUE = 3
'''

TARGET = "mynets.leaves.LeafNet"
CLASSES = ["healthy", "rust", "scab"]
LEAFNET_YAML = f"""\
_target_: {TARGET}
kwargs: {{width: 4}}
input: {{channels: 3, size: 16, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
output: 1
classes: [{", ".join(CLASSES)}]
"""


@pytest.fixture
def mynets(tmp_path, monkeypatch):
    """An importable package `mynets` (tmp_path/pkgs/mynets/leaves.py), forgotten again after the test."""
    pkgs = tmp_path / "pkgs"
    (pkgs / "mynets").mkdir(parents=True)
    (pkgs / "mynets" / "__init__.py").write_text("")
    (pkgs / "mynets" / "leaves.py").write_text(LEAVES)
    monkeypatch.syspath_prepend(str(pkgs))
    for name in [m for m in sys.modules if m == "mynets" or m.startswith("mynets.")]:
        monkeypatch.delitem(sys.modules, name)
    yield pkgs
    for name in [m for m in sys.modules if m == "mynets" or m.startswith("mynets.")]:
        del sys.modules[name]


def _leaves():
    import importlib

    return importlib.import_module("mynets.leaves")


@pytest.fixture
def study(tmp_path, mynets, monkeypatch):
    """A study folder (the current one) with conf/model/leafnet.yaml and 3 class folders of 6 PNGs each."""
    root = tmp_path / "study"
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "model" / "leafnet.yaml").write_text(LEAFNET_YAML)
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "images" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    monkeypatch.chdir(root)
    return root


def _hydra(root, tmp_path):
    """Overrides every CLI call here gets: the study's conf on Hydra's search path, Hydra's folder in tmp."""
    return [f"hydra.searchpath=[file://{root}/conf]", f"hydra.run.dir={tmp_path}/hydra"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- output selection -----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [TARGET, "mynets.leaves:make_net"])
def test_output_selection_returns_the_logits_element_and_keeps_every_layer_name(mynets, source):
    torch.manual_seed(0)
    model = build(source, kwargs={"width": 4}, output=1, in_channels=3, num_classes=3, image_size=16)
    raw = _leaves().LeafNet(width=4)
    raw.load_state_dict(model.state_dict())  # the same weights in the plain class
    raw.eval()
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(model(x), raw(x)[1])
    assert [n for n, _ in model.named_modules()] == [n for n, _ in raw.named_modules()]
    assert list(model.state_dict()) == list(raw.state_dict())
    # a layer hook sees what the layer of the plain class computes
    seen = {}
    dict(model.named_modules())["conv2"].register_forward_hook(lambda _m, _i, o: seen.setdefault("y", o))
    model(x)
    assert torch.equal(seen["y"], raw.conv2(raw.pool(raw.relu1(raw.conv1(x)))))
    # a deep copy (probe.models.head copies models) and a state dict round trip keep the selection
    assert torch.equal(copy.deepcopy(model)(x), raw(x)[1])
    again = build(source, kwargs={"width": 4}, output=1)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x), raw(x)[1])


def test_output_by_key_of_a_dict_and_the_logits_copy_of_attributions(mynets):
    from probe.models.head import logits_model

    model = build("mynets.leaves:DictNet", output="logits", in_channels=3, num_classes=3, image_size=16)
    x = torch.randn(2, 3, 16, 16)
    raw = type(model).forward(model, x)  # the class's own forward, without the selection
    assert torch.equal(model(x), raw["logits"])
    assert torch.equal(logits_model(model, x)(x), raw["logits"])  # no softmax: the scores themselves


# -- weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_files_round_trip_to_the_saved_models_outputs(mynets, tmp_path, suffix):
    torch.manual_seed(1)
    saved = _leaves().LeafNet(width=4).eval()
    path = tmp_path / f"leafnet{suffix}"
    if suffix == ".pt":
        torch.save(saved.state_dict(), path)
    else:
        save_file(saved.state_dict(), str(path))
    torch.manual_seed(2)  # another random init, which the weights must replace
    loaded = build(TARGET, weights=str(path), output=1, in_channels=3, num_classes=3, image_size=16)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(loaded(x), saved(x)[1])


def test_weights_of_another_architecture_name_the_first_mismatched_tensor(mynets, tmp_path):
    other = _leaves().LeafNet(width=8)
    torch.save(other.state_dict(), tmp_path / "wide.pt")
    own = _leaves().LeafNet(width=4).state_dict()
    first = next(k for k in own if own[k].shape != other.state_dict()[k].shape)  # in the model's order
    with pytest.raises(WeightsError) as e:
        build(TARGET, weights=str(tmp_path / "wide.pt"), output=1)
    assert f"'{first}' has shape {tuple(other.state_dict()[first].shape)}" in str(e.value)
    assert f"expects {tuple(own[first].shape)}" in str(e.value) and "wide.pt" in str(e.value)


# -- torchvision and timm by name -------------------------------------------------------------------------
def test_torchvision_prefix_is_torchvisions_own_architecture(capsys):
    import torchvision

    ours = build("torchvision:resnet18", num_classes=4)
    theirs = torchvision.models.resnet18(num_classes=4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert main(["summary", "model=torchvision:alexnet"]) == 0
    assert "Total params: 61,100,840" in capsys.readouterr().out  # the lecture's AlexNet table


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_timm_model_random_then_from_a_local_file_equals_timms_own(tmp_path, no_network):
    import timm
    torch.manual_seed(0)
    ours = build("timm:test_resnet", num_classes=3, in_channels=3, image_size=32)
    theirs = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    loaded = build("timm:test_resnet", num_classes=3, weights=str(tmp_path / "w.safetensors"))
    # timm's own loading of the same file
    reference = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"), num_classes=3)
                                  ).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), reference(x)) and torch.equal(ours(x), reference(x))


def test_timm_weights_come_from_timms_cache_or_name_where_they_are_missing(tmp_path, no_network, monkeypatch):
    import timm
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    with pytest.raises(WeightsError) as e:
        build("timm:test_resnet", weights="DEFAULT")
    assert str(tmp_path / "hf") in str(e.value) and cfg.hf_hub_id.replace("/", "--") in str(e.value)
    # the hub cache's layout: models--<org>--<name>/refs/main holds the revision; snapshots/<revision>/<file>
    saved = timm.create_model("test_resnet", pretrained=False).eval()
    repo = tmp_path / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(saved.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    loaded = build("timm:test_resnet", weights="DEFAULT")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), saved(x))
    with pytest.raises(ConfigError) as e:  # timm's own loaders would download or unpickle
        build("timm:test_resnet", kwargs={"pretrained": True})
    assert "kwargs: 'pretrained'" in str(e.value)


def test_timm_on_the_command_line_trains_and_summarises(tmp_path, capsys, no_network):
    import timm
    run_dir = tmp_path / "run"
    assert main(["train", "model=timm:test_resnet", "data.image_size=32", "train.epochs=0", "progress=false",
                 f"run_dir={run_dir}", f"hydra.run.dir={tmp_path}/hydra"]) == 0
    card = json.loads((run_dir / "card.json").read_text())
    assert card["model"]["name"] == "timm:test_resnet" and card["model"]["num_classes"] == 10
    assert card["model"]["input"]["channels"] == 3  # timm's default input: digits are converted to RGB
    assert card["params_total"] == sum(p.numel() for p in timm.create_model("test_resnet", num_classes=10).parameters())
    capsys.readouterr()
    assert main(["summary", "model=timm:test_resnet", "image_size=64"]) == 0
    out = capsys.readouterr().out
    assert "timm:test_resnet: input 3x64x64" in out and "conv1.0" in out


# -- entry points -----------------------------------------------------------------------------------------
def test_an_entry_point_of_an_installed_distribution_is_a_model(tmp_path, mynets, monkeypatch):
    site = tmp_path / "site"
    dist = site / "probe_leafnets-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-leafnets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[probe.models]\nleafnet_ep = mynets.leaves:make_net\n")
    monkeypatch.syspath_prepend(str(site))
    assert "leafnet_ep" in list_models()
    model = build("leafnet_ep", output=1, in_channels=3, num_classes=3, image_size=16)
    raw = _leaves().make_net()
    raw.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), raw.eval()(x)[1])
    run_dir = tmp_path / "run"
    assert main(["train", "model=leafnet_ep", "model.output=1", "+model.kwargs.num_classes=10", "data.image_size=16",
                 "train.epochs=1", "progress=false", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path}/hydra"]) == 0
    from probe.pipeline.rundir import load_run

    monkeypatch.chdir(tmp_path)  # no conf/ here: an entry point needs no trust
    run = load_run(run_dir)
    assert run.card["model"]["name"] == "leafnet_ep" and run.model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


# -- a study's model config ----------------------------------------------------------------------------------
def test_a_study_model_trains_on_its_images_is_named_by_its_config_and_is_analysed(study, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "leafnet"
    assert main(["train", "model=leafnet", "data=imagefolder", f"data.root={study}/images", "data.val_fraction=0.2",
                 "data.test_fraction=0.2", "train.epochs=1", "progress=false", f"run_dir={run_dir}",
                 *_hydra(study, tmp_path)]) == 0
    card = json.loads((run_dir / "card.json").read_text())
    m = card["model"]
    assert m["name"] == "leafnet" and m["_target_"] == TARGET and m["kwargs"] == {"width": 4}
    assert m["output"] == 1 and m["classes"] == CLASSES and m["num_classes"] == 3
    assert m["input"] == {"channels": 3, "size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert card["data"]["classes"] == CLASSES and card["data"]["image_size"] == 16
    # an analysis stage reads the tuple-output model through its selected output
    assert main(["activations", f"run={run_dir}", "data.split=all", *_hydra(study, tmp_path)]) == 0
    import pandas as pd

    from probe.pipeline.analysis import run_data
    from probe.pipeline.rundir import load_run

    run = load_run(run_dir)
    x = torch.stack([x for x, _ in run_data(run.card).all])
    assert len(x) == 18  # data.split=all: every image of the folder
    fc = pd.read_parquet(run_dir / "activations" / "stats.parquet").query("layer == 'fc'")
    with torch.no_grad():
        logits = run.model(x)
    assert fc["count"].tolist() == [18] * 3
    assert np.allclose(fc["mean"].to_numpy(), logits.double().mean(0).numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(["summary", "model=leafnet", *_hydra(study, tmp_path)]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in _leaves().LeafNet(width=4).parameters())
    assert "leafnet: input 3x16x16" in out and "conv2" in out and f"Total params: {total:,}" in out


def test_split_all_is_every_image_and_the_labels_follow_the_models_classes(study, tmp_path):
    from probe.pipeline.analysis import open_run
    from probe.pipeline.config import AnalysisData, AnalysisStage

    (study / "images" / "rust").rename(study / "rust_elsewhere")  # a class without a folder is fine
    run_dir = tmp_path / "run"
    assert main(["train", "model=leafnet", "data=imagefolder", f"data.root={study}/images", "train.epochs=0",
                 "progress=false", f"run_dir={run_dir}", *_hydra(study, tmp_path)]) == 0
    ctx = open_run(AnalysisStage(run=str(run_dir), data=AnalysisData(split="all")))
    assert len(ctx.dataset) == 12
    assert sorted(ctx.labels.tolist()) == [0] * 6 + [2] * 6  # healthy -> 0, scab -> 2 (the model's order)
    x, _ = ctx.dataset[0]
    first = sorted((study / "images" / "healthy").iterdir())[0]  # the folder's own order
    from torchvision.transforms.functional import pil_to_tensor, resize

    pixels = resize(pil_to_tensor(Image.open(first).convert("RGB")).float() / 255, [16, 16], antialias=True)
    assert torch.allclose(x, (pixels - 0.5) / 0.25, atol=1e-6)  # the model config's normalisation


BAD_MODELS = [
    # (change to leafnet.yaml, key named, what was found)
    ({"_target_": "mynets.leaves.NoSuch"}, "model._target_", "mynets.leaves has no attribute 'NoSuch'"),
    ({"_target_": "nosuchpkg.nets.Net"}, "model._target_", "does not import (no module named 'nosuchpkg')"),
    ({"_target_": "mynets.leaves.VALUE"}, "model._target_", "'mynets.leaves.VALUE' is not callable (found: int)"),
    ({"_target_": "mynets.leaves.raises"}, "model._target_", "raised RuntimeError: boom in the factory"),
    ({"_target_": "mynets.leaves.not_a_module"}, "model._target_", "returned int, not a torch.nn.Module"),
    ({"output": None}, "model.output", "the model returns tuple of 2 (Tensor (2, 8, 8, 8) float32, Tensor (2, 3)"),
    ({"output": 0}, "model.output", "must be (2, classes) for input 2x3x16x16; the model returns Tensor (2, 8, 8, 8)"),
    ({"output": 2}, "model.output", "2 does not index the model's tuple of 2"),
    ({"classes": ["healthy", "rust"]}, "model.output", "returns 3 class scores (Tensor (2, 3) float32); expected 2"),
    ({"kwargs": {"widht": 4}}, "model.kwargs", "does not accept keyword 'widht'; accepted: width, num_classes, in_channels"),
    ({"input": {"channels": 1, "size": 16}}, "model.input", "zeros (2x1x16x16) raised RuntimeError"),
]


@pytest.mark.parametrize("change,key,found", BAD_MODELS)
def test_a_bad_model_config_exits_2_naming_the_file_key_and_what_was_found(change, key, found, study, tmp_path, capsys):
    import yaml

    cfg = {**yaml.safe_load(LEAFNET_YAML), **change}
    (study / "conf" / "model" / "leafnet.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    code = main(["train", "model=leafnet", "train.epochs=0", "data.image_size=16", f"run_dir={run_dir}",
                 *_hydra(study, tmp_path)])
    line = _one_error_line(capsys)
    assert code == 2
    assert f"conf/model/leafnet.yaml: {key}: " in line and found in line, line
    assert not run_dir.exists() and not (tmp_path / "hydra").exists()  # nothing written


def test_a_model_with_fewer_class_scores_than_the_data_has_classes_is_refused(study, tmp_path, capsys):
    run_dir = tmp_path / "run"  # LeafNet's 3 scores, digits' 10 classes, no model.classes to match them
    assert main(["train", "model=leafnet", "model.classes=null", "train.epochs=0", f"run_dir={run_dir}",
                 *_hydra(study, tmp_path)]) == 2
    assert ("conf/model/leafnet.yaml: model: leafnet returns 3 class scores, the data has 10 classes (0, 1, 2, 3, 4, 5, "
            "6, 7, ...)") in _one_error_line(capsys)
    assert not (run_dir / "card.json").exists()


def test_an_import_path_on_the_command_line_is_a_model_option(mynets, tmp_path, capsys):
    assert main(["summary", "model=mynets.leaves:make_net", "model.output=1", "model.input.size=16"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("Conv2d-", "MaxPool2d-"))]
    # receptive fields by hand: conv1 3x3 -> 3, pool 2x2 stride 2 -> 4, conv2 3x3 on stride 2 -> 4 + 2 * 2 = 8
    assert [(r[1], r[-2]) for r in rows] == [("conv1", "3x3"), ("pool", "4x4"), ("conv2", "8x8")]
    assert "mynets.leaves:make_net: input 3x16x16" in out


def test_a_bad_import_path_on_the_command_line_exits_2(mynets, tmp_path, capsys):
    code = main(["train", "model=mynets.leaves:raises", f"run_dir={tmp_path}/run", f"hydra.run.dir={tmp_path}/hydra"])
    assert code == 2
    assert "model.name: 'mynets.leaves:raises' raised RuntimeError: boom in the factory" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "hydra").exists()


def test_a_card_naming_code_this_study_does_not_configure_is_refused_unless_trusted(study, tmp_path, capsys,
                                                                                     monkeypatch):
    from probe.pipeline.rundir import load_run

    run_dir = tmp_path / "run"
    assert main(["train", "model=leafnet", "data.image_size=16", "model.classes=null", "+model.kwargs.num_classes=10",
                 "train.epochs=0", "progress=false", f"run_dir={run_dir}", *_hydra(study, tmp_path)]) == 0
    assert load_run(run_dir).model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)  # configured here: accepted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a folder whose conf/ does not name the target
    with pytest.raises(RunDirError) as e:
        load_run(run_dir)
    assert TARGET in str(e.value) and f"trust=[{TARGET}]" in str(e.value)
    capsys.readouterr()
    assert main(["activations", f"run={run_dir}"]) == 2
    assert f"card.json: the model is built by '{TARGET}'" in _one_error_line(capsys)
    assert not (run_dir / "activations").exists() and not (run_dir / "logs").exists()
    assert load_run(run_dir, trust=[TARGET]).model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    assert main(["activations", f"run={run_dir}", f"trust=[{TARGET}]", "data.limit=8"]) == 0
