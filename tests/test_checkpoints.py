"""Weights: round trips, safe loading, torchvision weights from the hub cache only."""

import os
import pickle

import pytest
import torch

from probe.errors import WeightsError
from probe.models import build
from probe.models.weights import read_state_dict
from probe.pipeline.rundir import save_weights


def test_checkpoint_round_trips_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build("resnet_small")
    model.train()
    model(torch.randn(8, 1, 32, 32))  # move the batch-norm running statistics away from their init
    model.eval()
    save_weights(model, tmp_path / "m.safetensors")
    loaded = build("resnet_small", weights=str(tmp_path / "m.safetensors"))
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))


class _Evil:
    """Unpickling this calls os.system, which would create a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil(marker)}, f)
    with pytest.raises(WeightsError) as e:
        read_state_dict(path)
    assert str(path) in str(e.value)
    assert not marker.exists()
    with pytest.raises(WeightsError):
        build("lenet5", weights=str(path))
    assert not marker.exists()


def test_truncated_safetensors_names_the_file(tmp_path):
    save_weights(build("lenet5"), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        build("lenet5", weights=str(tmp_path / "cut.safetensors"))
    assert "cut.safetensors" in str(e.value)


def test_mismatched_shapes_name_the_first_tensor(tmp_path):
    save_weights(build("lenet5", num_classes=5), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError) as e:
        build("lenet5", weights=str(tmp_path / "m.safetensors"))
    assert "fc2.weight" in str(e.value) and "(5, 84)" in str(e.value)


def test_plain_torch_state_dict_loads_weights_only(tmp_path):
    model = build("lenet5")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = build("lenet5", weights=str(tmp_path / "m.pt"))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_torchvision_weights_come_from_the_hub_cache(hub_cache):
    import torchvision

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    with pytest.raises(WeightsError) as e:
        build("resnet18", weights="IMAGENET1K_V1")
    assert os.path.basename(url) in str(e.value) and str(hub_cache) in str(e.value)

    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    hub_cache.mkdir(parents=True)
    torch.save(reference.state_dict(), hub_cache / os.path.basename(url))
    loaded = build("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(reference.eval()(x), loaded(x))


def test_unknown_torchvision_weights_name_is_a_config_error():
    from probe.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build("resnet18", weights="IMAGENET1K_V9")
    assert "model.weights" in str(e.value) and "IMAGENET1K_V1" in str(e.value)
