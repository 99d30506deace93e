"""Bad configuration is refused before any work starts: exit code 2, one line naming the key."""

import pytest

from probe.pipeline.cli import main


@pytest.mark.parametrize(
    "overrides,key,hint",
    [
        (["train.foo=1"], "train.foo", "unknown key; allowed: epochs"),  # unknown key
        (["+bogus=1"], "bogus", "unknown key; allowed: data, model, train, seed"),  # added with +: OmegaConf would drop it silently
        (["+model.bogus2=2"], "model.bogus2", "unknown key; allowed: name"),
        (["+train.epochz=3"], "train.epochz", "did you mean 'epochs'"),
        (["data.batch_size=abc"], "data.batch_size", "Integer"),  # wrong type
        (["data.batch_size=-5"], "data.batch_size", ">= 1"),  # out of range
        (["train.lr=0"], "train.lr", "> 0"),  # out of range (open)
        (["train.epochs=-1"], "train.epochs", ">= 0"),
        (["model=lenet6"], "model", "did you mean 'lenet5'"),  # unknown model (group option)
        (["model.name=resnet_smal"], "model.name", "did you mean 'resnet_small'"),  # unknown model (value)
        (["data=digitz"], "data", "did you mean 'digits'"),  # unknown dataset
        (["train.optimizer=adamw"], "train.optimizer", "allowed: adam, sgd"),
        (["device=tpu"], "device", "allowed: auto, cpu, cuda"),
    ],
)
def test_bad_train_config_exits_2_naming_the_key(overrides, key, hint, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", *overrides, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert f"error: {key}" in err[0] and hint in err[0], err[0]
    assert not run_dir.exists()  # nothing was written


def test_an_added_key_is_refused_in_every_stage_and_a_dict_field_takes_any(tmp_path, capsys):
    assert main(["saliency", f"run={tmp_path}/none", "+saliency.foo=1"]) == 2  # before the run dir is read
    assert "saliency.foo: unknown key" in capsys.readouterr().err
    run_dir = tmp_path / "run"  # model.kwargs is a dict: its keys go to the model factory
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=0", "progress=false",
                 "+model.kwargs.width=8", f"run_dir={run_dir}"]) == 0
    import json

    assert json.loads((run_dir / "card.json").read_text())["model"]["kwargs"] == {"width": 8}


def test_unknown_stage_exits_2(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_summary_prints_the_lecture_table(capsys):
    assert main(["summary", "model=lenet5"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 61,706" in out and "Conv2d-7" in out and "32x32" in out


def test_summary_of_any_torchvision_model(capsys):
    assert main(["summary", "model=resnet50"]) == 0
    assert "Total params: 25,557,032" in capsys.readouterr().out
