"""Training writes a complete run dir; fails loudly on NaN; resumes exactly after an interruption."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import probe.pipeline.train as train_mod
from probe.pipeline.cli import main
from probe.pipeline.config import DataConfig, ModelConfig, TrainConfig, TrainStage
from probe.errors import NumericalError
from probe.pipeline.rundir import load_run, read_card

TINY = ["model=tiny_cnn", "data.image_size=16", "train.epochs=2", "progress=false"]


def _cfg(run_dir, **train) -> TrainStage:
    return TrainStage(data=DataConfig(image_size=16), model=ModelConfig(name="tiny_cnn"),
                      train=TrainConfig(**{"epochs": 3, "lr": 0.01, **train}), run_dir=str(run_dir), progress=False)


def test_train_cli_writes_a_complete_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, f"run_dir={run_dir}"]) == 0
    card = read_card(run_dir)
    assert card["model"]["name"] == "tiny_cnn" and card["run_name"] == "run"
    assert card["params_total"] == sum(p.numel() for p in load_run(run_dir).model.parameters())
    assert [layer["name"] for layer in card["layers"]][:2] == ["conv1", "relu1"]
    assert card["torch_threads"] == torch.get_num_threads()  # bytes are reproducible at a given thread count
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == card["metrics"] and metrics["epochs"] == 2 and 0 <= metrics["test_acc"] <= 1
    rows = list(csv.DictReader(open(run_dir / "train_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert "model:\n  name: tiny_cnn" in (run_dir / "config.yaml").read_text()


def test_test_accuracy_is_that_of_the_saved_model(tmp_path):
    run_dir = train_mod.train(_cfg(tmp_path / "run"))
    run = load_run(run_dir)
    from probe.pipeline.analysis import data_config
    from probe.data import load_data

    data = load_data(data_config(run.card), 1)
    x, y = data.test.tensors
    acc = (run.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(run.card["metrics"]["test_acc"])


def test_same_seed_same_weights(tmp_path):
    a = load_file(str(train_mod.train(_cfg(tmp_path / "a", epochs=1)) / "model.safetensors"))
    b = load_file(str(train_mod.train(_cfg(tmp_path / "b", epochs=1)) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_training_and_writes_no_card(tmp_path):
    cfg = _cfg(tmp_path / "run", lr=float("inf"), optimizer="sgd", momentum=0.0)
    with pytest.raises(NumericalError) as e:
        train_mod.train(cfg)
    assert "epoch" in str(e.value) and "loss" in str(e.value)
    assert not (tmp_path / "run" / "card.json").exists()


def test_resume_after_interruption_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    reference = load_file(str(train_mod.train(_cfg(tmp_path / "ref")) / "model.safetensors"))

    calls = {"n": 0}
    real_evaluate = train_mod.evaluate

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the validation of epoch 3: epochs 1 and 2 are saved
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(_cfg(tmp_path / "run"))
    assert not (tmp_path / "run" / "card.json").exists()
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    resumed = load_file(str(train_mod.train(_cfg(tmp_path / "run", resume=True)) / "model.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "run" / "train_log.csv"))] == [1, 2, 3]


def test_snapshots_are_kept(tmp_path):
    run_dir = train_mod.train(_cfg(tmp_path / "run", snapshot_epochs=[0, 2]))
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["epoch_0000.safetensors", "epoch_0002.safetensors"]


def test_retraining_removes_the_analyses_of_the_old_weights(tmp_path):
    from conftest import CHEAP

    run_dir = tmp_path / "run"
    assert main(["train", *TINY, f"run_dir={run_dir}"]) == 0
    assert main(["activations", f"run={run_dir}", *CHEAP["activations"]]) == 0
    assert main(["activations", f"run={run_dir}", "shard=0/2", *CHEAP["activations"]]) == 0
    (run_dir / "notes.txt").write_text("mine")  # not an analysis: kept
    old = (run_dir / "model.safetensors").read_bytes()
    assert main(["train", *TINY, "seed=1", f"run_dir={run_dir}"]) == 0
    assert (run_dir / "model.safetensors").read_bytes() != old
    assert not (run_dir / "activations").exists() and not (run_dir / "activations_shards").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
    # a bad config changes nothing
    assert main(["activations", f"run={run_dir}", *CHEAP["activations"]]) == 0
    assert main(["train", *TINY, "train.lr=-1", f"run_dir={run_dir}"]) == 2
    assert (run_dir / "activations" / "stats.parquet").is_file() and (run_dir / "card.json").is_file()
