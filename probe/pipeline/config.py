"""Typed configuration schema for every stage, registered in Hydra's ConfigStore.

OmegaConf checks keys and types when YAML is merged into these dataclasses; ranges and names
are checked in ``__post_init__``, which runs when a stage calls :func:`to_object`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from probe.errors import ConfigError, check_choice, check_range, closest  # noqa: F401  (re-exported)
from probe.pipeline.model import InputConfig, ModelConfig, check_model  # noqa: F401  (the model group's schema)


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder")
DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("train", "val", "test", "all")
# `threads`: torch's CPU kernels split reductions by thread, so weights and saliency maps depend on the thread
# count at float rounding. Every stage sets it from its config rather than inheriting it from the launcher
# (joblib's workers get one thread each, a plain run all cores), so a sweep and a sequential run of one job,
# wherever they run, compute with the same number of threads.


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"  # where torchvision datasets and image folders live
    download: bool = False  # torchvision datasets only: fetch when missing
    image_size: int = 32  # images are resized to image_size x image_size
    channels: Optional[int] = None  # None: what the model expects
    normalize: str = "dataset"  # dataset (train-split mean/std) | imagenet | none
    split_seed: int = 0  # the train/val/test split and the probe images depend on this only
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    batch_size: int = 64
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_choice("data.name", self.name, DATASETS)
        check_choice("data.normalize", self.normalize, ("dataset", "imagenet", "none"))
        check_range("data.image_size", self.image_size, 8)
        if self.channels is not None:
            check_choice("data.channels", self.channels, (1, 3))
        check_range("data.val_fraction", self.val_fraction, 0.0, 0.5, low_open=True)
        check_range("data.test_fraction", self.test_fraction, 0.0, 0.5, low_open=True)
        check_range("data.batch_size", self.batch_size, 1)
        check_range("data.num_workers", self.num_workers, 0)


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    amp: bool = False  # bf16 autocast on CUDA
    resume: bool = False
    snapshot_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, 0)
        check_range("train.lr", self.lr, 0.0, low_open=True)
        check_choice("train.optimizer", self.optimizer, ("adam", "sgd"))
        check_range("train.momentum", self.momentum, 0.0, 1.0)
        check_range("train.weight_decay", self.weight_decay, 0.0)
        for e in self.snapshot_epochs:
            check_range("train.snapshot_epochs", e, 0, self.epochs)


@dataclass
class TrainStage:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"
    deterministic: bool = True
    threads: int = 1  # torch's CPU threads: set, never inherited (the note on `threads` above)
    progress: bool = True  # progress bars (silent anyway when stderr is not a terminal)
    run_dir: str = "."

    def __post_init__(self) -> None:
        check_range("seed", self.seed, 0)
        check_choice("device", self.device, DEVICES)
        check_range("threads", self.threads, 1)
        check_model(self.model, self.data)  # your own model is built and checked before anything is written


@dataclass
class SummaryStage:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    image_size: Optional[int] = None  # None: the model's default input size


@dataclass
class AnalysisData:
    """Which images an analysis stage reads; the dataset itself is the one recorded in the run's card."""

    split: str = "test"  # train | val | test | all (every image of the dataset, in its own order)
    batch_size: int = 128
    limit: Optional[int] = None  # only the first `limit` images of the split
    probe_per_class: int = 1  # fixed probe images (same for every model): this many per class

    def __post_init__(self) -> None:
        check_choice("data.split", self.split, SPLITS)
        check_range("data.batch_size", self.batch_size, 1)
        check_range("data.limit", self.limit, 1)
        check_range("data.probe_per_class", self.probe_per_class, 1)


@dataclass
class AnalysisStage:
    """What every analysis stage (activations, saliency, synthesize, geometry) shares."""

    run: str = MISSING  # the run dir to analyse
    data: AnalysisData = field(default_factory=AnalysisData)
    # import paths a run's card may name (beside those the study's conf/model/*.yaml configure): a run dir
    # from elsewhere never makes probe import code the command did not name
    trust: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    deterministic: bool = True
    threads: int = 1  # torch's CPU threads: set, never inherited (the note on `threads` above)

    def __post_init__(self) -> None:
        check_range("seed", self.seed, 0)
        check_choice("device", self.device, DEVICES)
        check_range("threads", self.threads, 1)


def to_object(cfg: DictConfig):
    """Turn a composed config into its dataclass, raising :class:`ConfigError` on bad values."""
    from omegaconf.errors import OmegaConfBaseException

    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), _schema_of(cfg))
    if unknown:
        raise ConfigError(unknown_key_message(*unknown[0], _schema_of(cfg)))
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:  # e.g. a missing mandatory value
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {getattr(e, 'msg', str(e)).splitlines()[0]}") from None


def _schema_of(cfg: DictConfig):
    """The dataclass a composed config is typed by (None for an untyped one)."""
    return OmegaConf.get_type(cfg)


def unknown_keys(node: dict, schema, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the keys allowed beside it) for every key of ``node`` that dataclass ``schema`` does not
    declare. Hydra's ``+key=value`` adds keys that OmegaConf then drops silently when it builds the dataclass;
    a ``dict`` field (``model.kwargs``) takes any key."""
    if schema is None or not is_dataclass(schema):
        return []
    declared = {f.name: f for f in fields(schema)}
    out = []
    for k, v in node.items():
        if k not in declared:
            out.append((f"{prefix}{k}", list(declared)))
        elif isinstance(v, dict):
            sub = _field_type(schema, k)
            out += unknown_keys(v, sub, f"{prefix}{k}.")
    return out


def declared_keys(schema, prefix: str = "") -> list[str]:
    """Every dotted key that dataclass ``schema`` declares, those of its nested dataclasses included."""
    out = []
    for f in fields(schema):
        out.append(prefix + f.name)
        sub = _field_type(schema, f.name)
        if sub is not None:
            out += declared_keys(sub, f"{prefix}{f.name}.")
    return out


def unknown_key_message(key: str, allowed: list[str], schema) -> str:
    """``key: unknown key (did you mean 'x'?); allowed: ...`` for a dotted ``key`` that ``schema`` lacks, where
    ``allowed`` are the keys declared beside its first unknown part. The hint is the shallowest declared key
    that ends with ``key`` when there is one (``layers`` -> ``activations.layers``: a key that lives in its
    stage's namespace), else the allowed key closest to the last part."""
    moved = [k for k in declared_keys(schema) if k.endswith(f".{key}")] if is_dataclass(schema) else []
    shallowest = [k for k in moved if k.count(".") == min((m.count(".") for m in moved), default=0)]
    hint = f" (did you mean '{shallowest[0]}'?)" if len(shallowest) == 1 else closest(key.rsplit(".", 1)[-1], allowed)
    return f"{key}: unknown key{hint}; allowed: {', '.join(allowed)}"


def _field_type(schema, name: str):
    """The dataclass type of field ``name`` of ``schema`` (resolving string annotations), or None."""
    import typing

    hint = typing.get_type_hints(schema).get(name)
    return hint if is_dataclass(hint) else None
