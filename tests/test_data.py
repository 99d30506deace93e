"""Embedded digits data: real images, fixed splits, recorded normalisation."""

import numpy as np
import pytest
import torch
from PIL import Image

from probe.pipeline.config import DataConfig
from probe.data import load_data, probe_indices, split_indices
from probe.errors import DataError


def test_digits_split_is_fixed_by_the_seed():
    a = load_data(DataConfig(split_seed=0), 1)
    b = load_data(DataConfig(split_seed=0), 1)
    c = load_data(DataConfig(split_seed=1), 1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert not torch.equal(a.test.tensors[1], c.test.tensors[1])


def test_split_is_a_partition():
    s = split_indices(1797, 0.15, 0.15, seed=3)
    allidx = torch.cat([s["train"], s["val"], s["test"]]).sort().values
    assert torch.equal(allidx, torch.arange(1797))
    assert len(s["test"]) == round(1797 * 0.15)


def test_digits_are_the_sklearn_images_normalised_with_train_statistics():
    from sklearn.datasets import load_digits

    d = load_data(DataConfig(image_size=8), 1)  # no resizing at 8x8
    assert d.num_classes == 10 and d.channels == 1
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    train_pixels = d.denormalize(d.train.tensors[0])
    # the train split's mean after normalisation is 0, std 1
    assert abs(d.train.tensors[0].mean().item()) < 1e-5
    assert abs(d.train.tensors[0].std().item() - 1) < 1e-3
    # the denormalised pixels are the sklearn images / 16
    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    s = split_indices(1797, 0.15, 0.15, 0)
    assert torch.allclose(train_pixels[:, 0], raw[s["train"]], atol=1e-5)


def test_digits_resize_and_rgb():
    d = load_data(DataConfig(image_size=32), 3)
    x, y = d.test[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1])


def test_probe_indices_cover_every_class_and_are_seeded():
    labels = np.repeat(np.arange(5), 7)
    idx = probe_indices(labels, per_class=2, seed=0)
    assert sorted(np.bincount(labels[idx])) == [2] * 5
    assert np.array_equal(idx, probe_indices(labels, 2, 0))


def test_image_folder_reports_corrupt_and_non_image_files(tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    (root / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="imagefolder", root=str(root), image_size=16), 3)
    assert "broken.png" in str(e.value) and "notes.txt" in str(e.value)


def test_image_folder_loads_and_converts(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((12, 9), 20 * i, np.uint8), mode="L").save(root / c / f"{i}.png")
    d = load_data(DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.2, test_fraction=0.2), 3)
    assert d.classes == ["a", "b"] and d.channels == 3
    x, _ = d.train[0]
    assert x.shape == (3, 16, 16)
    assert d.notes["converted_to_RGB"] == 10


def test_missing_torchvision_dataset_says_where(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="mnist", root=str(tmp_path)), 1)
    assert str(tmp_path) in str(e.value) and "data.download=true" in str(e.value)
