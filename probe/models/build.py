"""``build(source, ...)``: the one way probe makes a model, whatever its source (:mod:`probe.models.sources`)."""

from __future__ import annotations

import inspect
import re
from typing import Callable

import torch
import torch.nn as nn

from probe.models.output import Selector, check_classifier, select_output
from probe.models.sources import IMPORT, TIMM, TORCHVISION, ZOO, ModelError, Source, parse_source, resolve, spec
from probe.models.weights import hub_cache_only, is_weights_file, load_into, read_state_dict, torchvision_weights


def build(
    source: str,
    *,
    kwargs: dict | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    weights: str | None = None,
    output: Selector | None = None,
) -> nn.Module:
    """Build the model ``source`` names, in eval mode.

    kwargs: the arguments of its factory. probe's zoo, torchvision and timm models are built for
        ``in_channels`` and ``num_classes`` (defaults: the source's own); your own callables (import paths,
        entry points) get exactly ``kwargs``, and ``in_channels`` / ``num_classes`` are what they are checked
        against.
    weights: a local ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file (pickles read with
        ``weights_only=True``), a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``: torch hub cache) or,
        for timm, ``DEFAULT`` or a pretrained tag (timm's caches). Nothing is ever downloaded.
    output: the element of a tuple / list / dict output holding the class scores (``0``, ``"logits"``);
        ``model(x)`` then returns that element (:func:`probe.models.output.select_output`).
    image_size: when given, the model is checked on zeros ``(2, in_channels, image_size, image_size)``: the
        output (after ``output``) must be a float tensor ``(2, num_classes)``.

    Raises :class:`~probe.models.sources.ModelError` (a ``ConfigError``) naming the argument at fault and what
    was found, or :class:`~probe.errors.WeightsError` naming the weights file and the first mismatched tensor.
    """
    src = parse_source(source)
    kwargs = dict(kwargs or {})
    s = spec(src)
    if src.kind == ZOO:
        model = _call(s.factory, {"in_channels": in_channels or s.channels, "num_classes": num_classes or s.num_classes,
                                  **kwargs}, f"'{src}'")
    elif src.kind == TORCHVISION:
        model = _torchvision(src.name, num_classes, weights, kwargs)
    elif src.kind == TIMM:
        from probe.models.timm_source import create

        model = create(src.name, in_channels=in_channels, num_classes=num_classes, kwargs=kwargs)
    else:
        what = f"'{src}'" if src.kind == IMPORT else f"entry point '{src}'"
        model = _call(resolve(src), kwargs, what)
        if not isinstance(model, nn.Module):
            raise ModelError("source", f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(model, src, weights)
    model.eval()
    if image_size is not None:
        x = torch.zeros(2, in_channels or s.channels, image_size, image_size)
        check_classifier(model, x, output, num_classes)
    if output is not None:
        select_output(model, output)
    return model


def _torchvision(name: str, num_classes: int | None, weights: str | None, kwargs: dict) -> nn.Module:
    import torchvision

    if weights is not None and not is_weights_file(weights):  # named weights fix the number of classes
        with hub_cache_only():
            return torchvision.models.get_model(name, weights=torchvision_weights(name, weights), **kwargs)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", False)
    return _call(lambda **kw: torchvision.models.get_model(name, weights=None, **kw),
                 {"num_classes": num_classes or 1000, **kwargs}, f"'{name}'")


def _load_weights(model: nn.Module, src: Source, weights: str) -> None:
    if is_weights_file(weights):
        load_into(model, read_state_dict(weights), weights)
    elif src.kind == TIMM:
        from probe.models.timm_source import cached_weights

        path = cached_weights(src.name, weights)
        load_into(model, read_state_dict(path), path)
    elif src.kind != TORCHVISION:  # torchvision's named weights were loaded with the model
        raise ModelError("weights", f"'{weights}' is not a weights file (.safetensors, .pt, .pth, .bin); named "
                                    f"weights exist for torchvision and timm models only")


def _call(factory: Callable[..., nn.Module], kwargs: dict, what: str) -> nn.Module:
    """``factory(**kwargs)``, with a keyword it does not take, or an exception it raises, as a :class:`ModelError`."""
    accepted = _keywords(factory)
    if accepted is not None:
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ModelError("kwargs", f"{what} does not accept keyword '{unknown[0]}'; accepted: {', '.join(accepted) or 'none'}")
    try:
        return factory(**kwargs)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad:
            raise ModelError("kwargs", f"{what} does not accept keyword '{bad.group(1)}' ({e})") from None
        raise ModelError("source", f"{what} raised TypeError: {_first_line(e)}") from None
    except ModelError:
        raise
    except Exception as e:
        raise ModelError("source", f"{what} raised {type(e).__name__}: {_first_line(e)}") from None


def _keywords(factory) -> list[str] | None:
    """The keyword arguments ``factory`` declares, or None when it takes ``**kwargs`` (or has no signature)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
