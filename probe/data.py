"""Datasets: scikit-learn's bundled digits (default, no download), torchvision's MNIST,
FashionMNIST and CIFAR-10, and any folder of class subfolders.

Every dataset yields ``(image, label)`` with ``image`` a float tensor ``(C, H, W)`` normalised with
the recorded mean and std; :class:`DataBundle` carries the three splits (and ``all``, every image in the
dataset's own order) and that recipe. With a model's own class order (``classes``), the dataset's classes
are matched to it by name: ``label`` is the index of the image's class among the model's classes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from probe.pipeline.config import DataConfig
from probe.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val", "test", "all")


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    test: Dataset
    all: Dataset  # every image (train, val and test together), in the dataset's own order
    classes: list[str]  # label i is classes[i]
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    notes: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Dataset:
        if name not in SPLITS:
            raise ConfigError(f"data.split: '{name}' is not allowed; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)

    def card(self) -> dict:
        """What the model card records about the data."""
        return {
            "classes": self.classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "sizes": {s: len(getattr(self, s)) for s in ("train", "val", "test")},
            **self.notes,
        }

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(N, C, H, W)`` back to pixel values in [0, 1]."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x * std + mean


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """A fixed random train/val/test partition of ``range(n)`` that depends on ``seed`` only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(N, C, H, W)`` to ``channels`` (grey -> RGB by repetition, RGB -> grey by luminance)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if x.shape[1] == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise DataError(f"cannot convert {x.shape[1]} channels to {channels}")


def class_labels(found: list[str], classes: list[str] | None, where: Path | str) -> tuple[list[str], list[int]]:
    """The bundle's classes and the label of each of the dataset's ``found`` classes: with the model's own
    ``classes``, each found class is matched to it by name (a class it lacks is a :class:`DataError`), else the
    found ones in their order."""
    if classes is None:
        return list(found), list(range(len(found)))
    for c in found:
        if c not in classes:
            raise DataError(f"{where}: class '{c}' is not one of the model's classes (model.classes); "
                            f"allowed: {', '.join(classes)}")
    return list(classes), [list(classes).index(c) for c in found]


Norm = tuple[list[float], list[float]]  # per-channel mean and std


def _normalisation(cfg: DataConfig, train_pixels: torch.Tensor, channels: int, given: Norm | None) -> Norm:
    if given is not None:
        return [float(v) for v in given[0]], [float(v) for v in given[1]]
    if cfg.normalize == "none":
        return [0.0] * channels, [1.0] * channels
    if cfg.normalize == "imagenet":
        if channels != 3:
            return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    # numpy reduces in one fixed order; torch's CPU reductions split by thread, so the recorded statistics (and
    # card.json's bytes) would depend on the thread count (at 1e-12)
    x = train_pixels.double().numpy()
    return x.mean((0, 2, 3)).tolist(), np.maximum(x.std((0, 2, 3), ddof=1), 1e-6).tolist()


def _tensor_bundle(cfg, images: torch.Tensor, labels: torch.Tensor, classes, channels, splits, notes, given) -> DataBundle:
    """Images ``(N, C, H, W)`` in [0, 1] -> normalised in-memory splits."""
    images = convert_channels(images, channels)
    mean, std = _normalisation(cfg, images[splits["train"]], channels, given)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = ((images - m) / s).float()
    parts = {k: TensorDataset(images[idx], labels[idx]) for k, idx in splits.items()}
    return DataBundle(parts["train"], parts["val"], parts["test"], TensorDataset(images, labels), list(classes),
                      channels, cfg.image_size, [float(v) for v in mean], [float(v) for v in std], notes)


def load_digits(cfg: DataConfig, channels: int, given: Norm | None = None, classes: list[str] | None = None) -> DataBundle:
    """scikit-learn's 1,797 bundled 8x8 digits, resized (bilinear) to ``image_size`` and scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    names, labels = class_labels([str(c) for c in range(10)], classes, "digits")
    y = torch.tensor(labels, dtype=torch.long)[torch.tensor(d.target, dtype=torch.long)]
    splits = split_indices(len(y), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return _tensor_bundle(cfg, x, y, names, channels, splits, {"source": "sklearn.datasets.load_digits"}, given)


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's modes of 16-bit greyscale images (PNG, TIFF)
UNSCALED = ("I", "F")  # 32-bit integer and float pixels: no bit depth says what 1.0 is


def pil_to_unit(img, channels: int) -> torch.Tensor:
    """A PIL image as a float tensor ``(channels, H, W)`` in [0, 1], scaled by its bit depth (8-bit: /255,
    16-bit greyscale: /65535) before grey -> RGB repetition or RGB -> grey luminance."""
    from torchvision.transforms.functional import pil_to_tensor

    if img.mode in SIXTEEN_BIT:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0)[None, None]
        return convert_channels(x, channels)[0]
    return pil_to_tensor(img.convert("RGB" if channels == 3 else "L")).float().div(255)


class _Transformed(Dataset):
    """A PIL-image dataset (or a subset of one) turned into normalised tensors of a fixed size."""

    def __init__(self, base, indices, size: int, channels: int, mean, std, labels: list[int] | None = None):
        self.base, self.indices = base, list(map(int, indices))
        self.size, self.channels = size, channels
        self.labels = labels  # the base's label i is labels[i] (None: as it is)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        from torchvision.transforms.functional import pil_to_tensor, resize

        img, label = self.base[self.indices[i]]
        x = resize(pil_to_unit(img, self.channels), [self.size, self.size], antialias=True)
        return (x - self.mean) / self.std, label if self.labels is None else self.labels[label]


def _pil_stats(base, indices, cfg, channels, given: Norm | None) -> Norm:
    if given is not None or cfg.normalize != "dataset":
        return _normalisation(cfg, torch.zeros(1, channels, 1, 1), channels, given)
    # mean/std from up to 2,000 training images is plenty and keeps start-up fast
    sample = _Transformed(base, indices[:2000], cfg.image_size, channels, [0.0] * channels, [1.0] * channels)
    x = torch.stack([sample[i][0] for i in range(len(sample))])
    return _normalisation(cfg, x, channels, None)


def load_torchvision(cfg: DataConfig, channels: int, given: Norm | None = None,
                     classes: list[str] | None = None) -> DataBundle:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[cfg.name]
    root = Path(cfg.root)
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as e:
        raise DataError(
            f"{cfg.name}: not found under {root.resolve()} ({e}); set data.download=true to fetch it, "
            f"or data.root to where it is"
        ) from None
    frac = cfg.val_fraction
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = round(len(train) * frac)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    mean, std = _pil_stats(train, train_idx, cfg, channels, given)
    names, labels = class_labels(list(train.classes), classes, cfg.name)
    mk = lambda base, idx: _Transformed(base, idx, cfg.image_size, channels, mean, std, labels)  # noqa: E731
    every = ConcatDataset([mk(train, range(len(train))), mk(test, range(len(test)))])
    return DataBundle(mk(train, train_idx), mk(train, val_idx), mk(test, range(len(test))), every, names,
                      channels, cfg.image_size, mean, std, {"source": f"torchvision.datasets.{cls.__name__}"})


def scan_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str], dict]:
    """Check every file of an image folder; raise :class:`DataError` listing every bad path. Returns the
    samples (path, label), the classes (the model's ``classes`` when given, each folder matched to one by
    name; else the sorted folder names) and the count of each image mode."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (data.root)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class>/<image files>)")
    classes, labels = class_labels(folders, classes, root)
    samples, problems, modes = [], [], {}
    for label, c in zip(labels, folders):
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            problems.append(f"{root / c}: empty class folder")
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(f"{f}: not an image file (suffix {f.suffix or 'none'})")
                continue
            try:
                with Image.open(f) as im:
                    im.load()
                    modes[im.mode] = modes.get(im.mode, 0) + 1
                    if im.mode in UNSCALED:
                        problems.append(f"{f}: {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels "
                                        f"(mode {im.mode}) have no bit depth to scale by; save as 8- or 16-bit")
                        continue
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                problems.append(f"{f}: unreadable image ({type(e).__name__})")
                continue
            samples.append((f, label))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(f"{root}: {len(problems)} bad entries: {shown}")
    return samples, classes, modes


class _ImageFiles(Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            return im.copy(), label


def load_image_folder(cfg: DataConfig, channels: int, given: Norm | None = None,
                      classes: list[str] | None = None) -> DataBundle:
    root = Path(cfg.root)
    samples, classes, modes = scan_image_folder(root, classes)
    want = "RGB" if channels == 3 else "L"
    converted = sum(n for m, n in modes.items() if m != want)
    if converted:
        log.info("%s: %d of %d images converted to %s (modes found: %s)", root, converted, len(samples), want, modes)
    base = _ImageFiles(samples)
    splits = split_indices(len(samples), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    mean, std = _pil_stats(base, splits["train"], cfg, channels, given)
    mk = lambda idx: _Transformed(base, idx, cfg.image_size, channels, mean, std)  # noqa: E731
    notes = {"source": str(root), "converted_to_" + want: converted}
    return DataBundle(mk(splits["train"]), mk(splits["val"]), mk(splits["test"]), mk(range(len(samples))), classes,
                      channels, cfg.image_size, mean, std, notes)


def load_data(cfg: DataConfig, channels: int, *, mean: list[float] | None = None, std: list[float] | None = None,
              classes: list[str] | None = None) -> DataBundle:
    """The dataset named by ``cfg`` with images of ``channels`` channels (``cfg.channels`` wins when set),
    resized to ``cfg.image_size``. ``mean``/``std`` (per channel): normalise with these instead of
    ``cfg.normalize``. ``classes``: the model's own class order (see :func:`class_labels`)."""
    channels = cfg.channels or channels
    given = None if mean is None else (list(mean), list(std))
    if cfg.name == "digits":
        return load_digits(cfg, channels, given, classes)
    if cfg.name == "imagefolder":
        return load_image_folder(cfg, channels, given, classes)
    return load_torchvision(cfg, channels, given, classes)


def probe_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Fixed probe samples: ``per_class`` images of every class, chosen by ``seed``, in class order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.extend(sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False)))
    return np.asarray(chosen, dtype=np.int64)


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Labels of a dataset without decoding its images when it can."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    if isinstance(ds, _Transformed):
        base = ds.base
        if hasattr(base, "targets"):
            t = np.asarray(base.targets)[ds.indices]
            return t if ds.labels is None else np.asarray(ds.labels)[t]
        if isinstance(base, _ImageFiles):
            return np.asarray([base.samples[i][1] for i in ds.indices])
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices)]
    if isinstance(ds, ConcatDataset):
        return np.concatenate([dataset_labels(d) for d in ds.datasets])
    return np.asarray([ds[i][1] for i in range(len(ds))])


def data_card(cfg: DataConfig, bundle: DataBundle) -> dict:
    return {**asdict(cfg), **bundle.card()}
