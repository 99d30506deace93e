"""Where a model comes from: one string, the *source*, names it.

=======================  ===============================================================================
``lenet5``               probe's own zoo (:func:`probe.models.registry.register_model`)
``resnet18``             a torchvision classifier by its torchvision name (also ``torchvision:resnet18``)
``timm:resnet18``        a timm model (``pip install 'probe[timm]'``)
``mypkg.nets:make_net``  any importable callable returning an ``nn.Module``: ``module:attribute`` ...
``mypkg.nets.LeafNet``   ... or a dotted path, as Hydra's ``_target_`` writes it
``leafnet``              a name an installed package registers in the entry-point group ``probe.models``
=======================  ===============================================================================

A bare name is looked up in that order: probe's zoo, torchvision, then entry points (an entry point cannot
change what ``resnet18`` means). The object an entry point names is used like a ``_target_``: a callable
``(**kwargs) -> nn.Module`` (a function or a class), for example in a package's ``pyproject.toml``::

    [project.entry-points."probe.models"]
    leafnet = "mynets.leaves:LeafNet"

Parsing a source imports nothing that the source names; :func:`resolve` imports it (user code runs there).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from probe.errors import ConfigError, closest
from probe.models.registry import _REGISTRY, ModelSpec, torchvision_names

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "probe.models"
ZOO, TORCHVISION, TIMM, ENTRY_POINT, IMPORT = "probe", "torchvision", "timm", "entry_point", "import"


class ModelError(ConfigError):
    """A model that cannot be built or used as a classifier. ``key`` is the argument at fault (``source``,
    ``kwargs``, ``weights``, ``output``, ``input``), ``detail`` says what was found; the message is
    ``"<key>: <detail>"``, and a caller that knows the config file and keys re-words it."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.key, self.detail = key, detail


@dataclass(frozen=True)
class Source:
    kind: str  # ZOO | TORCHVISION | TIMM | ENTRY_POINT | IMPORT
    name: str  # the zoo / torchvision / timm / entry-point name, or the import path as given

    @property
    def adapts(self) -> bool:
        """Whether probe builds it for ``in_channels`` and ``num_classes`` (else: from its kwargs only)."""
        return self.kind in (ZOO, TORCHVISION, TIMM)

    @property
    def runs_user_code(self) -> bool:
        """Whether building it imports a module that the source string names (not one installed for probe)."""
        return self.kind == IMPORT

    def __str__(self) -> str:
        return f"timm:{self.name}" if self.kind == TIMM else self.name


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The ``probe.models`` entry points of the installed distributions, by name (first one wins)."""
    out: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep)
    return out


def list_models(filter: str = "") -> list[str]:
    """Every model buildable by a bare name (probe's zoo, torchvision's, then entry points), optionally
    containing ``filter``. timm's models are ``timm:<name>`` (``timm.list_models()``)."""
    names = list(_REGISTRY)
    names += [n for n in torchvision_names() if n not in _REGISTRY]
    taken = set(names)
    for name, ep in entry_points().items():
        if name in taken:
            log.warning("entry point %s = %s (group %s) is shadowed by probe's or torchvision's model %s",
                        name, ep.value, ENTRY_POINT_GROUP, name)
        else:
            names.append(name)
    return [n for n in names if filter in n]


def parse_source(text: str) -> Source:
    """The :class:`Source` a string names (imports nothing the string names). Raises :class:`ModelError`."""
    text = str(text).strip()
    scheme, sep, rest = text.partition(":")
    if sep and scheme == "torchvision":
        if rest not in torchvision_names():
            raise ModelError("source", f"'{text}': torchvision has no classifier '{rest}'{closest(rest, torchvision_names())}")
        return Source(TORCHVISION, rest)
    if sep and scheme == "timm":
        _check_timm_name(rest)
        return Source(TIMM, rest)
    if sep:
        if not scheme or not rest:
            raise ModelError("source", f"'{text}': expected module:attribute (mypkg.nets:make_net)")
        return Source(IMPORT, text)
    if text in _REGISTRY:
        return Source(ZOO, text)
    if text in torchvision_names():
        return Source(TORCHVISION, text)
    if text in entry_points():
        return Source(ENTRY_POINT, text)
    if "." in text:
        return Source(IMPORT, text)
    names = list_models()
    raise ModelError("source", f"'{text}' is not a model probe knows{closest(text, names)}; give one of "
                               f"{', '.join(names[:8])}, ... (probe.models.list_models()), timm:<name>, "
                               f"torchvision:<name>, or an import path (mypkg.nets:make_net, mypkg.nets.LeafNet)")


def spec(source: str | Source) -> ModelSpec:
    """Default input and classes of a source (imports only timm, for a timm source). For your own callables
    they are unknown: 3 channels, 224 x 224, ``num_classes`` None."""
    src = source if isinstance(source, Source) else parse_source(source)
    if src.kind == ZOO:
        return _REGISTRY[src.name]
    if src.kind == TORCHVISION:
        size = 299 if src.name == "inception_v3" else 224
        return ModelSpec(src.name, None, 3, size, 1000, False, TORCHVISION)
    if src.kind == TIMM:
        from probe.models.timm_source import pretrained_cfg

        cfg = pretrained_cfg(src.name)
        return ModelSpec(src.name, None, cfg.input_size[0], cfg.input_size[-1], cfg.num_classes,
                         bool(cfg.fixed_input_size), TIMM)
    return ModelSpec(src.name, None, 3, 224, None, False, src.kind)


def resolve(src: Source) -> Callable[..., nn.Module]:
    """The callable behind an entry-point or import source (this imports its module). Raises :class:`ModelError`."""
    if src.kind == ENTRY_POINT:
        ep = entry_points()[src.name]
        try:
            obj = ep.load()
        except Exception as e:
            raise ModelError("source", f"'{src.name}': entry point {ep.value} (group {ENTRY_POINT_GROUP}) does not "
                                       f"load ({_first_line(e)})") from None
        what = f"entry point {src.name} = {ep.value}"
    elif src.kind == IMPORT:
        obj, what = locate(src.name), f"'{src.name}'"
    else:
        raise ValueError(f"{src} is built by probe, not resolved")
    if not callable(obj):
        raise ModelError("source", f"{what} is not callable (found: {type(obj).__name__})")
    return obj


def locate(path: str):
    """The object at ``module:attribute`` or dotted ``module.attribute`` (importing the module). The longest
    importable prefix of a dotted path is the module; a module that fails while importing is reported as such."""
    if ":" in path:
        module_name, attrs = path.split(":", 1)
        module = _import(module_name, path)
    else:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            module_name = ".".join(parts[:i])
            try:
                module = _import(module_name, path)
            except _NotFound:
                if i == 1:
                    raise ModelError("source", f"'{path}' does not import (no module named '{parts[0]}')") from None
                continue
            break
        attrs = ".".join(parts[i:])
        if not attrs:
            raise ModelError("source", f"'{path}' is a module, not a callable returning an nn.Module")
    obj = module
    for depth, attr in enumerate(attrs.split(".")):
        if not hasattr(obj, attr):
            owner = module_name + "".join(f".{a}" for a in attrs.split(".")[:depth])
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelError("source", f"'{path}': {owner} has no attribute '{attr}'{closest(attr, public)}")
        obj = getattr(obj, attr)
    return obj


class _NotFound(Exception):
    pass


def _import(module_name: str, path: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # the module itself (or a parent package) is missing: for a dotted path, try a shorter module
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            if ":" in path:
                raise ModelError("source", f"'{path}' does not import (no module named '{e.name}')") from None
            raise _NotFound from None
        raise ModelError("source", f"'{path}': importing {module_name} raised {_first_line(e)}") from None
    except Exception as e:  # the module's own code failed
        raise ModelError("source", f"'{path}': importing {module_name} raised {_first_line(e)}") from None


def _check_timm_name(name: str) -> None:
    try:
        import timm
    except ImportError:
        raise ModelError("source", f"'timm:{name}': timm is not installed (pip install 'probe[timm]')") from None
    if not timm.is_model(name):
        names = timm.list_models()
        raise ModelError("source", f"'timm:{name}': timm has no model '{name}'{closest(name, names)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
