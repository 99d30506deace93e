"""Training writes a complete run dir; fails loudly on NaN; resumes exactly after an interruption."""

import csv
import json
from pathlib import Path

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
    env = json.loads((run_dir / "environment.json").read_text())  # beside the card, not in it (not hashed by DVC)
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] and set(env) == {"git_commit", "versions", "cpu_capability"}
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not {"versions", "git_commit"} & set(card)
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
    pred = run.model(x).argmax(1)
    acc = (pred == y).float().mean().item()
    assert acc == pytest.approx(run.card["metrics"]["test_acc"])
    # the card's confusion matrix, counted here image by image: row = true class, column = predicted
    k = len(run.card["data"]["classes"])
    expected = [[int(((y == i) & (pred == j)).sum()) for j in range(k)] for i in range(k)]
    assert run.card["evaluation"] == {"split": "test", "confusion": expected, "predicted_outside": [0] * k}


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
    assert main(["activations", f"run={run_dir}", "activations.shard=0/2", *CHEAP["activations"]]) == 0
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


def test_the_card_records_how_to_rebuild_the_model_and_the_input_it_takes(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "model=vgg_small", "model.input.size=24", "+model.kwargs.hidden=16", "train.epochs=0",
                 "progress=false", f"run_dir={run_dir}"]) == 0
    card = read_card(run_dir)
    m = card["model"]
    assert m["name"] == "vgg_small" and m["_target_"] is None and m["kwargs"] == {"hidden": 16}
    assert m["output"] is None and m["classes"] is None and m["num_classes"] == 10 and m["in_channels"] == 1
    # model.input.size wins over data.image_size (32): the images are resized to what the model takes
    assert m["input"]["size"] == 24 and card["data"]["image_size"] == 24
    assert m["input"]["mean"] == card["data"]["mean"] and m["input"]["std"] == card["data"]["std"]
    assert card["layers"][0]["output_shape"] == [16, 24, 24]
    run = load_run(run_dir)
    assert run.model.classifier[1].out_features == 16  # rebuilt with its kwargs
    from probe.pipeline.analysis import run_data

    x, _ = run_data(run.card).test[0]
    assert x.shape == (1, 24, 24)


@pytest.mark.parametrize("overrides,hint", [
    (["model=lenet5", "model.input.size=28"], "model.input.size: lenet5 accepts 32x32 inputs only; got 28"),
    (["model=tiny_cnn", "model.input.channels=2"], "model.input.channels: '2' is not allowed; allowed: 1, 3"),
    (["model=tiny_cnn", "model.input.mean=[0.5,0.5]", "model.input.std=[1,1]", "model.input.channels=1"],
     "model.input.mean: 2 values for 1 channels"),
    (["model=tiny_cnn", "model.weights=DEFAULT"], "model.weights: 'DEFAULT' is not a weights file"),
])
def test_a_bad_model_input_exits_2_and_writes_nothing(overrides, hint, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *overrides, "data.image_size=16", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path}/h"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert hint in err[0], err[0]
    assert not run_dir.exists() and not (tmp_path / "h").exists()


def test_a_model_with_fewer_class_scores_than_the_data_has_classes_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "+model.kwargs.num_classes=4", f"run_dir={run_dir}"]) == 2
    assert "model.output: the model returns 4 class scores (Tensor (2, 4) float32); expected 10" in capsys.readouterr().err
    assert not (run_dir / "card.json").exists()


def test_the_card_is_the_same_bytes_in_another_environment(tmp_path):
    """Outputs DVC hashes must not depend on the machine (issue 15, items 6 and 12): a run made where the
    launcher allows 1 thread and one where it allows 2 give byte-identical card.json, config.yaml and weights
    (probe sets the thread count from `threads`)."""
    import os
    import subprocess
    import sys

    probe = str(Path(sys.executable).parent / "probe")
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        (tmp_path / str(threads)).mkdir()
        subprocess.run([probe, "train", "model=tiny_cnn", "data.image_size=16", "train.epochs=0", "progress=false",
                        "run_dir=run", "hydra.run.dir=logs"], check=True, env=env, capture_output=True,
                       cwd=tmp_path / str(threads))
    a, b = tmp_path / "1" / "run", tmp_path / "2" / "run"
    for name in ("card.json", "config.yaml", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_nan_in_retraining_leaves_the_previous_run_dir_byte_identical(tmp_path):
    """Retraining is staged (issue 15, item 3): the card, weights, config, log and analyses of the last complete
    run survive a retraining that hits NaN, and nothing of the failed one is left."""
    run = tmp_path / "run"
    assert main(["train", *TINY, f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"]) == 0
    assert main(["activations", f"run={run}", "data.limit=64", "activations.images=false"]) == 0

    def files():
        return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    before = files()
    assert {"card.json", "model.safetensors", "config.yaml", "train_log.csv"} <= {str(p) for p in before}
    assert any(p.parts[0] == "activations" for p in before)
    code = main(["train", *TINY, "train.lr=1e30", "train.optimizer=sgd", "train.momentum=0",
                 f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"])
    assert code == 1  # a run that failed on valid input
    assert files() == before
    assert not (run / ".training").exists()


def test_a_finished_retraining_replaces_the_run_and_its_analyses(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"]) == 0
    assert main(["activations", f"run={run}", "data.limit=64", "activations.images=false"]) == 0
    old = (run / "model.safetensors").read_bytes()
    assert main(["train", *TINY, "seed=1", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"]) == 0
    assert (run / "model.safetensors").read_bytes() != old and read_card(run)["seed"] == 1
    assert not (run / "activations").exists() and not (run / ".training").exists()


def test_two_commands_on_one_run_dir_the_second_stops_naming_the_first(tmp_path, capsys):
    """Issue 15, item 4: a retraining never replaces the weights under a running analysis, nor an analysis
    reads weights being replaced, and two commands never write the same folder at once. The lock is the OS's
    (flock), taken here by this process the way a running command takes it."""
    import os

    from probe.pipeline.rundir import file_lock, weights_lock

    run = tmp_path / "run"
    train = ["train", *TINY, f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"]
    assert main(train) == 0
    activations = ["activations", f"run={run}", "data.limit=64", "activations.images=false"]
    assert main(activations) == 0

    def files():
        return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
                and "logs" not in p.parts}

    before = files()
    capsys.readouterr()
    with weights_lock(run, write=True, what="probe train"):  # a training in progress
        assert main(activations) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"probe activations: error: {run}: in use by probe train (retraining it); wait for it to " \
                   f"finish (probe activations needs it)", line
    with weights_lock(run, write=False, what="probe saliency"):  # an analysis reading the weights
        assert main(train) == 2
    assert "in use by an analysis reading its weights" in capsys.readouterr().err
    with file_lock(run / ".activations.lock", what="probe activations"):  # a second writer of activations/
        assert main(activations) == 2
    line = capsys.readouterr().err.strip()
    assert line.endswith(f"in use by probe activations (pid {os.getpid()} on {os.uname().nodename}); wait for it "
                         f"to finish (lock .activations.lock)"), line
    assert files() == before  # nothing was replaced or half-written
    assert main(activations) == 0  # and the locks went with their holders
    assert not list(run.glob(".*.lock"))


def test_an_analysis_of_other_weights_is_detected_by_the_report_and_the_next_stage(tmp_path):
    """Each analysis records the SHA-256 of the weights it read; weights replaced behind its back (a race, a copy)
    make it stale: the report shows it as such, and synthesis does not take its exemplars as the yardstick."""
    import hashlib
    import shutil

    from probe.pipeline.report.collect import load_runs
    from probe.pipeline.rundir import stale
    from probe.pipeline.synthesis.stage import activations_best

    run, other = tmp_path / "run", tmp_path / "other"
    for d, seed in ((run, 0), (other, 1)):
        assert main(["train", *TINY, f"seed={seed}", f"run_dir={d}", f"hydra.run.dir={tmp_path / 'logs'}"]) == 0
    assert main(["activations", f"run={run}", "data.limit=64", "activations.images=false"]) == 0
    recorded = json.loads((run / "activations" / "metrics.json").read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert stale(run, "activations") is None and activations_best(run)

    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    assert "activations/ was computed from other weights" in stale(run, "activations")
    assert activations_best(run) == {}
    (r,) = load_runs([run])
    assert not r.has("activations") and r.table("activations", "stats") is None and "activations" not in r.metrics
