"""Embedded digits data: real images, fixed splits, recorded normalisation."""

import numpy as np
import pytest
import torch
from PIL import Image

from probe.pipeline.config import DataConfig
from probe.data import dataset_labels, load_data, probe_indices, split_indices
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


def _folders(root, names, per_class=3):
    for k, c in enumerate(names):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((10, 10, 3), 10 * k + i, np.uint8)).save(root / c / f"{i}.png")


def test_image_folders_are_matched_to_the_models_classes_by_name(tmp_path):
    root = tmp_path / "imgs"
    _folders(root, ["scab", "healthy"])  # no "rust" folder: a class without images is fine
    classes = ["healthy", "rust", "scab"]
    d = load_data(DataConfig(name="imagefolder", root=str(root), image_size=8, normalize="none"), 3, classes=classes)
    assert d.classes == classes and d.num_classes == 3
    for x, y in d.all:  # every image's label is its folder's index among the model's classes
        k = round(float(x[0, 0, 0]) * 255) // 10  # the folder's position in _folders: scab 0, healthy 1
        assert classes[int(y)] == ["scab", "healthy"][k]


def test_a_folder_that_is_not_one_of_the_models_classes_is_named(tmp_path):
    root = tmp_path / "imgs"
    _folders(root, ["healthy", "mildew"])
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="imagefolder", root=str(root), image_size=8), 3, classes=["healthy", "rust"])
    assert "'mildew'" in str(e.value) and "allowed: healthy, rust" in str(e.value)


def test_split_all_is_every_image_once(tmp_path):
    d = load_data(DataConfig(image_size=8), 1)
    parts = torch.cat([d.train.tensors[0], d.val.tensors[0], d.test.tensors[0]])
    everything = d.all.tensors[0]
    assert len(everything) == 1797 == len(parts)
    # the same images (as multisets): sort both by their bytes
    key = lambda t: sorted(map(lambda r: r.numpy().tobytes(), t.flatten(1)))  # noqa: E731
    assert key(everything) == key(parts)
    root = tmp_path / "imgs"
    _folders(root, ["a", "b"], per_class=5)
    f = load_data(DataConfig(name="imagefolder", root=str(root), image_size=8, val_fraction=0.2, test_fraction=0.2), 3)
    assert len(f.split("all")) == 10 and sorted(dataset_labels(f.all).tolist()) == [0] * 5 + [1] * 5
    assert len(f.train) + len(f.val) + len(f.test) == 10


def test_the_models_mean_and_std_replace_the_datasets_statistics():
    from sklearn.datasets import load_digits

    d = load_data(DataConfig(image_size=8), 1, mean=[0.25], std=[0.5])
    assert d.mean == [0.25] and d.std == [0.5]
    raw = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    assert torch.allclose(d.all.tensors[0][:, 0], (raw - 0.25) / 0.5, atol=1e-6)


def test_16_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    """A 16-bit greyscale PNG round-trips to value / 65535 (8-bit conversion saturated 99.6% of it to 255),
    and grey -> RGB repeats that value."""
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535 in steps of 257
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(ramp).save(tmp_path / c / "x.png")
    assert Image.open(tmp_path / "a" / "x.png").mode.startswith("I;16")
    for channels in (1, 3):
        cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, normalize="none",
                         val_fraction=0.01, test_fraction=0.01)
        x = load_data(cfg, channels).all[0][0]
        assert x.shape == (channels, 16, 16)
        np.testing.assert_allclose(x.numpy(), np.broadcast_to(ramp / 65535.0, (channels, 16, 16)), atol=1e-6)


def test_images_without_a_bit_depth_are_refused_by_name(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((8, 8), 3.5, dtype=np.float32)).save(tmp_path / c / "f.tif")
    with pytest.raises(DataError, match=r"a/f.tif: floating-point pixels \(mode F\)"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)), 1)
