"""Everything the pipeline knows about models: the ``model`` config group, its schema, building a study's
model from it (with errors naming the config file and key), the model section of ``card.json``, and
rebuilding a run's model from that section without importing code the user did not name.

A model config is an option of the ``model`` group, for example a study's ``conf/model/leafnet.yaml``::

    _target_: mynets.leaves.LeafNet      # any importable callable returning an nn.Module
    kwargs: {width: 16}                  # its arguments
    weights: weights/leafnet.pt          # optional: .safetensors, or .pt/.pth read with weights_only=True
    input: {channels: 3, size: 96, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    output: 0                            # the element of a tuple/list/dict output holding the class scores
    classes: [healthy, rust, scab]       # the model's own class order (image folders are matched by name)

selected with ``model=leafnet``; its ``name`` is the option's name (``leafnet``), set by probe. Without
``_target_``, ``name`` is what is built: probe's zoo (``model=lenet5``), torchvision (``model=resnet18``,
``model=torchvision:vgg16``), timm (``model=timm:resnet18``), an import path (``model=mypkg.nets:make_net``)
or an entry point (:mod:`probe.models.sources`); these need no file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.nn as nn
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from probe.errors import ConfigError, RunDirError, WeightsError, check_choice, check_range
from probe.models.sources import TIMM, TORCHVISION, ModelError, parse_source, spec
from probe.models.weights import is_weights_file

MODEL_GROUP = "model"
NAME_GROUP = "model_name"  # the defaults list's `- model_name@model: ${model}` writes the option's name into model.name
STUDY_MODELS = Path("conf") / MODEL_GROUP  # a study's model configs, relative to the study folder (the current one)


@dataclass
class InputConfig:
    """What the model takes: images (channels, size, size), normalised as (x - mean) / std."""

    channels: Optional[int] = None  # None: data.channels, else the model's default (probe's zoo: its own; others: 3)
    size: Optional[int] = None  # None: data.image_size
    mean: Optional[list[float]] = None  # per channel; None: data.normalize decides
    std: Optional[list[float]] = None


@dataclass
class ModelConfig:
    name: str = "lenet5"  # the model's name in run dirs, cards and reports: the `model=` option; see _target_
    _target_: Optional[str] = None  # what builds the model (import path or any name probe builds); None: `name`
    kwargs: dict[str, Any] = field(default_factory=dict)  # the arguments of the callable
    # a local .safetensors / .pt / .pth file, a torchvision weights name (DEFAULT, IMAGENET1K_V1: torch hub cache)
    # or for timm DEFAULT / a pretrained tag (timm's caches); never downloaded
    weights: Optional[str] = None
    input: InputConfig = field(default_factory=InputConfig)
    output: Optional[Any] = None  # int or str: which element of the forward's tuple/list/dict output holds the scores
    classes: Optional[list[str]] = None  # the model's class order; None: the data's (sorted folder names)

    @property
    def source(self) -> str:
        """The string :func:`probe.models.build` builds from."""
        return self._target_ or self.name

    @property
    def source_key(self) -> str:
        return "_target_" if self._target_ else "name"

    def __post_init__(self) -> None:
        """Cheap checks only (nothing the config names is imported here; :func:`check_model` builds it)."""
        try:
            src = parse_source(self.source)
        except ModelError as e:
            raise self.error(e) from None
        if self.weights is not None and not is_weights_file(self.weights) and src.kind not in (TORCHVISION, TIMM):
            raise self.error(ModelError("weights", f"'{self.weights}' is not a weights file (.safetensors, .pt, "
                                                   f".pth, .bin); named weights exist for torchvision and timm only"))
        i = self.input
        if i.channels is not None:
            self._check(check_choice, "input.channels", i.channels, (1, 3))
        self._check(check_range, "input.size", i.size, 8)
        if (i.mean is None) != (i.std is None):
            raise self.error(ModelError("input", "give both mean and std, or neither"))
        for key, values in (("input.mean", i.mean), ("input.std", i.std)):
            if values is not None and i.channels is not None and len(values) != i.channels:
                raise self.error(ModelError(key, f"{len(values)} values for {i.channels} channels"))
        if i.std is not None and min(i.std) <= 0:
            raise self.error(ModelError("input.std", f"{list(i.std)}: every value must be > 0"))
        if self.output is not None and (not isinstance(self.output, (int, str)) or isinstance(self.output, bool)):
            raise self.error(ModelError("output", f"{self.output!r}: give an index (0) or a key (logits)"))
        if self.classes is not None:
            dup = next((c for c in self.classes if list(self.classes).count(c) > 1), None)
            if not self.classes or dup is not None:
                raise self.error(ModelError("classes", f"duplicate class '{dup}'" if dup else "empty list"))

    def _check(self, check, key: str, *args) -> None:
        try:
            check(f"model.{key}", *args)
        except ConfigError as e:
            raise ConfigError(f"{self.where()}{e}") from None

    def where(self) -> str:
        """``conf/model/<name>.yaml: `` when the study has that file, else an empty string."""
        path = STUDY_MODELS / f"{self.name}.yaml"
        return f"{path}: " if path.is_file() else ""

    def error(self, e: ModelError) -> ConfigError:
        """``e`` as one line naming the config file (when there is one) and the config key."""
        key = self.source_key if e.key == "source" else e.key
        return ConfigError(f"{self.where()}model.{key}: {e.detail}")


@dataclass(frozen=True)
class ModelInput:
    """The input a run's model takes, resolved from ``model.input`` and ``data``."""

    channels: int
    size: int
    mean: Optional[list[float]]  # None: the data's normalisation (data.normalize)
    std: Optional[list[float]]


def model_input(model: ModelConfig, data) -> ModelInput:
    """``model.input`` completed from ``data`` (a DataConfig) and the model's defaults."""
    i = model.input
    channels = i.channels or data.channels or spec(model.source).channels
    return ModelInput(channels, i.size or data.image_size, i.mean, i.std)


def build_model(model: ModelConfig, channels: int, size: int, num_classes: Optional[int] = None) -> nn.Module:
    """Build ``model`` for inputs (channels, size, size) and check it on zeros of that shape: probe's zoo,
    torchvision and timm are built for ``num_classes`` (None: their own); your own callables are checked
    against ``len(model.classes)``. Errors name the config file and key."""
    from probe.models import build

    adapts = parse_source(model.source).adapts
    expected = num_classes if adapts else (len(model.classes) if model.classes else None)
    try:
        return build(model.source, kwargs=model.kwargs, in_channels=channels, num_classes=expected, image_size=size,
                     weights=model.weights, output=model.output)
    except ModelError as e:
        raise model.error(e) from None
    except WeightsError as e:  # the file names itself; say which config and key gave it
        raise WeightsError(f"{model.where()}model.weights: {e}") from None


def check_model(model: ModelConfig, data) -> None:
    """Before anything is written: the input size an architecture is fixed to, and a model whose code probe
    does not know (an import path or an entry point) built with its weights and checked on zeros of its
    input. probe's zoo, torchvision and timm models were checked by name; their weights are read when the
    stage starts (their number of classes comes from the data)."""
    i = model_input(model, data)
    if i.mean is not None and len(i.mean) != i.channels:
        raise model.error(ModelError("input.mean", f"{len(i.mean)} values for the {i.channels} channels the model "
                                                   f"gets (set model.input.channels)"))
    s = spec(model.source)
    if s.fixed_size and i.size != s.image_size:
        key = "model.input.size" if model.input.size else "data.image_size"
        raise ConfigError(f"{model.where()}{key}: {model.name} accepts {s.image_size}x{s.image_size} inputs only; "
                          f"got {i.size}")
    if not parse_source(model.source).adapts:
        build_model(model, i.channels, i.size)


def card_section(model: ModelConfig, built: nn.Module, data_bundle) -> dict:
    """The ``model`` section of ``card.json``: the config (how to rebuild it), the input it takes (after
    resolution: the normalisation is the data's), and the number of class scores it returns."""
    import torch

    with torch.no_grad():
        scores = built(torch.zeros(1, data_bundle.channels, data_bundle.image_size, data_bundle.image_size))
    return {**asdict(model), "in_channels": data_bundle.channels, "num_classes": int(scores.shape[-1]),
            "input": {"channels": data_bundle.channels, "size": data_bundle.image_size,
                      "mean": list(data_bundle.mean), "std": list(data_bundle.std)}}


def configured_sources(root: Path = STUDY_MODELS) -> set[str]:
    """What the study's model configs (``conf/model/*.yaml``) build: their ``_target_`` (or ``name``)."""
    found = set()
    for path in sorted(root.glob("*.yaml")) if root.is_dir() else []:
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:  # not a model config this study can use; Hydra reports it when it is chosen
            continue
        if isinstance(cfg, dict):
            found.add(str(cfg.get("_target_") or cfg.get("name") or path.stem))
    return found


def trusted_source(card: dict, where: str, trust: Sequence[str] = ()) -> str:
    """What builds the model of a run's ``card`` (``where``: the card, for messages), refused with a
    :class:`RunDirError` when it is an import path that neither this study configures (``conf/model/*.yaml``)
    nor ``trust`` lists: a run dir from elsewhere never makes probe import code the user did not name. probe's
    zoo, torchvision, timm and entry points (installed packages) are always fine."""
    m = card["model"]
    source = m.get("_target_") or m["name"]
    try:
        src = parse_source(source)
    except ModelError as e:
        raise RunDirError(f"{where}: model: {e.detail}") from None
    if src.runs_user_code and source not in set(trust) | configured_sources():
        raise RunDirError(f"{where}: the model is built by '{source}', code that this study does not configure; "
                          f"to import it, pass trust=[{source}] or add a {STUDY_MODELS}/<name>.yaml with "
                          f"_target_: {source}")
    return source


def rebuild(card: dict, where: str, weights: Optional[str] = None, trust: Sequence[str] = ()) -> nn.Module:
    """The model a run's card describes, architecture only or with ``weights`` (a file), once
    :func:`trusted_source` allows it."""
    from probe.models import build

    m = card["model"]
    source = trusted_source(card, where, trust)
    try:
        return build(source, kwargs=m["kwargs"], in_channels=m["in_channels"], num_classes=m["num_classes"],
                     weights=weights, output=m.get("output"))
    except ModelError as e:
        raise RunDirError(f"{where}: model.{e.key}: {e.detail}") from None


# -- the `model` group's options ---------------------------------------------------------------------------
def register_options() -> None:
    """Make every model an option of the ``model`` group: probe's zoo, torchvision and entry-point names in
    Hydra's ConfigStore (last on the search path: a study's ``conf/model/<name>.yaml`` of the same name wins),
    and every ``module:callable``, ``timm:<name>`` and ``torchvision:<name>`` on demand (:class:`ModelOptions`
    answers for any such value). The ``model_name`` group gives every option its own name."""
    from probe.models import list_models

    cs = ConfigStore.instance()
    for name in list_models():
        cs.store(group=MODEL_GROUP, name=name, node={"name": name})
    Plugins.instance().register(ModelOptions)
    Plugins.instance().register(ModelOptionsPath)


class ModelOptions(ConfigSource):
    """A Hydra config source: ``model/<a:b>`` -> ``{name: a:b}`` (what builds it: :mod:`probe.models.sources`),
    and ``model_name/<x>`` -> ``{name: x}`` for any option ``x`` of the model group."""

    @staticmethod
    def scheme() -> str:
        return "probe-models"

    @staticmethod
    def _split(config_path: str) -> tuple[str, str]:
        group, _, name = config_path.rstrip("/").partition("/")
        return group, name[: -len(".yaml")] if name.endswith(".yaml") else name

    def load_config(self, config_path: str) -> ConfigResult:
        _, name = self._split(config_path)
        return ConfigResult(provider=self.provider, path=self.full_path(), config=OmegaConf.create({"name": name}),
                            header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.rstrip("/") in (MODEL_GROUP, NAME_GROUP)

    def is_config(self, config_path: str) -> bool:
        group, name = self._split(config_path)
        return bool(name) and (group == NAME_GROUP or (group == MODEL_GROUP and ":" in name))

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> list[str]:
        if config_path == "" and results_filter in (None, ObjectType.GROUP):
            return [NAME_GROUP]
        return []  # the options it answers for are any string of their form


class ModelOptionsPath(SearchPathPlugin):
    """Puts :class:`ModelOptions` on Hydra's search path (after the package's configs)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="probe-models", path=f"{ModelOptions.scheme()}://")
