"""One pass of the same images through several models feeds CKA of every layer pair and unit correlations."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from probe.errors import ConfigError, check_range
from probe.hooks import Capture, check_layers, model_device, resolve_layers
from probe.runtime import fast_model, to_device_batch
from probe.similarity.cka import CKA, MIN_IMAGES, Gram
from probe.similarity.matching import UnitCorrelation

log = logging.getLogger(__name__)


@dataclass
class Similarity:
    """What :func:`compare` returns: the :class:`~probe.similarity.cka.CKA` accumulator over every captured
    ``"<model>/<layer>"``, a :class:`~probe.similarity.matching.UnitCorrelation` per requested pair, the
    minibatch size used, the images used and those dropped (the remainder shorter than one minibatch)."""

    cka: CKA
    units: dict[tuple[str, str], UnitCorrelation] = field(default_factory=dict)
    layers: dict[str, list[str]] = field(default_factory=dict)
    batch_size: int = 0
    images: int = 0
    images_dropped: int = 0

    def result(self) -> pd.DataFrame:
        """:meth:`CKA.result`: one row per unordered pair of keys."""
        return self.cka.result()

    def unit_summary(self) -> pd.DataFrame:
        """One row per matched pair of layers: :meth:`UnitCorrelation.summary`."""
        return pd.DataFrame([u.summary() for u in self.units.values()])


def _split_key(key: str, models: Mapping[str, nn.Module]) -> tuple[str, str]:
    model, sep, layer = str(key).partition("/")
    if not sep or model not in models:
        raise ConfigError(f"match: '{key}' is not '<model>/<layer>' with a model among {', '.join(models)}")
    return model, layer


def _inputs(batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A batch as ``{model: input (N, C, H, W)}``: a Mapping per model, a tensor, or an ``(x, y)`` pair for all."""
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ConfigError(f"batches: a batch maps models {sorted(map(str, batch))} to inputs; missing {missing}")
        xs = {n: batch[n][0] if isinstance(batch[n], (tuple, list)) else batch[n] for n in names}
    else:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        xs = {n: x for n in names}
    xs = {n: torch.as_tensor(x) for n, x in xs.items()}
    sizes = {n: len(x) for n, x in xs.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"batches: every model needs the same images; got batch sizes {sizes}")
    return xs


class _Rechunk:
    """Re-cuts a stream of batches into minibatches of exactly ``size`` images (at most one loader batch plus
    ``size`` images are held); what is left at the end is the dropped remainder."""

    def __init__(self, size: int):
        self.size, self.count = size, 0
        self.parts: dict[str, list[torch.Tensor]] = {}

    def push(self, xs: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        for n, x in xs.items():
            self.parts.setdefault(n, []).append(x)
        self.count += len(next(iter(xs.values())))
        while self.count >= self.size:
            out = {}
            for n, parts in self.parts.items():
                whole = parts[0] if len(parts) == 1 else torch.cat(parts)
                out[n], rest = whole[: self.size], whole[self.size :]
                self.parts[n] = [rest] if len(rest) else []
            self.count -= self.size
            yield out


@torch.no_grad()
def compare(models: Mapping[str, nn.Module], batches: Iterable, layers: Mapping[str, Sequence[str]] | None = None,
            device: torch.device | str | None = None, match: Sequence[tuple[str, str]] = (),
            batch_size: int | None = None, precision: str = "float32") -> Similarity:
    """Minibatch CKA of every pair of layers of ``models`` (each model with itself and with the others) and the
    unit correlations of the layer pairs in ``match``, in one streaming pass over ``batches``.

    ``models``: name -> module (names without ``/``). ``batches``: an iterable (a DataLoader ...) whose items are
    a Mapping ``{model name: input (N, C, H, W)}`` (the same images, prepared for each model: models may need
    their own normalisation or size), or one tensor ``(N, C, H, W)`` or one ``(x, y)`` pair used for every
    model. ``layers``: model name -> module names (a model left out, or given None / empty: every layer of
    :func:`probe.hooks.default_layers`; an unknown name raises :class:`probe.errors.LayerNotFound` listing the
    valid ones). Keys are ``"<model>/<layer>"``. ``match``: pairs ``("a/layer", "b/layer")`` whose units are
    correlated (:class:`~probe.similarity.matching.UnitCorrelation`; the layers need not be among ``layers``).
    ``device``: where models and images go (default each model's own). ``precision``: of the Gram matrices
    (:func:`~probe.similarity.cka.centred_gram`).

    ``batch_size`` (>= 4; default: the size of the first batch): the stream is re-cut into minibatches of
    exactly this many images, so every minibatch estimate has the same size and weight (Nguyen et al. 2021
    use one fixed minibatch size) and the result does not depend on how a loader batches the images; the
    remainder shorter than one minibatch (a loader's last, partial batch) is dropped and counted in
    ``images_dropped``.

    Models run in eval mode (restored afterwards) without gradients; each minibatch goes through every model
    once. Gram matrices are formed inside the forward hooks (before any in-place ReLU that follows a layer),
    so only ``(n, n)`` per layer is kept; the outputs of the ``match`` layers are cloned until the pair's
    update. Memory does not grow with the number of images.
    """
    names = [str(n) for n in models]
    for n in names:
        if "/" in n:
            raise ConfigError(f"models: name '{n}' contains '/'; keys are '<model>/<layer>'")
    if not names:
        raise ConfigError("models: no models given")
    check_range("batch_size", batch_size, MIN_IMAGES)
    layers = dict(layers or {})
    unknown = [k for k in layers if k not in models]
    if unknown:
        raise ConfigError(f"layers: models {unknown} are not among the models given ({', '.join(names)})")
    chosen = {n: list(dict.fromkeys(resolve_layers(models[n], layers.get(n), key=f"layers['{n}']"))) for n in names}
    pairs = [(str(a), str(b)) for a, b in match]
    wanted: dict[str, list[str]] = {n: list(chosen[n]) for n in names}  # layers hooked per model
    for key in {k for p in pairs for k in p}:
        m, layer = _split_key(key, models)
        check_layers(models[m], [layer], key="match")
        if layer not in wanted[m]:
            wanted[m].append(layer)
    devices = {n: model_device(models[n]) if device is None else torch.device(device) for n in names}
    nets = {n: fast_model(models[n], devices[n]) for n in names}

    acc = CKA(precision)
    units = {p: UnitCorrelation(*p) for p in pairs}
    keep = {k for p in pairs for k in p}
    order = [f"{n}/{layer}" for n in names for layer in chosen[n]]  # the result's key order: models, then layers
    cka_keys = set(order)
    grams: dict[str, Gram] = {}
    kept: dict[str, torch.Tensor] = {}

    running: list[str] = [""]  # the model whose forward pass is running (one module may be given twice)

    def recorder(model: str):
        def record(layer: str, out: torch.Tensor) -> None:
            if running[0] != model:
                return
            key = f"{model}/{layer}"
            if key in cka_keys:
                grams[key] = acc.gram(out)
            if key in keep:
                kept[key] = out.clone()
        return record

    result = Similarity(acc, units, {n: list(chosen[n]) for n in names})
    modes = {n: m.training for n, m in nets.items()}
    seen = 0
    try:
        with contextlib.ExitStack() as stack:
            for n, net in nets.items():
                net.eval()
                stack.enter_context(Capture(net, wanted[n], fn=recorder(n)))
            chunks: _Rechunk | None = None
            for batch in batches:
                xs = _inputs(batch, names)
                seen += len(xs[names[0]])
                if chunks is None:
                    size = batch_size or len(xs[names[0]])
                    if size < MIN_IMAGES:
                        raise ConfigError(f"batch_size: the first batch has {size} images; minibatch CKA needs at least "
                                          f"{MIN_IMAGES} (pass batch_size)")
                    chunks, result.batch_size = _Rechunk(size), size
                for chunk in chunks.push(xs):
                    grams.clear()
                    kept.clear()
                    for n, net in nets.items():
                        running[0] = n
                        net(to_device_batch(chunk[n], devices[n]))
                    running[0] = ""
                    missing = sorted((cka_keys - set(grams)) | (keep - set(kept)))
                    if missing:
                        raise ValueError(f"layers: {missing} gave no tensor output in the forward pass")
                    acc.update_grams({k: grams[k] for k in order})
                    for (a, b), u in units.items():
                        u.update(kept[a], kept[b])
                    result.images += len(chunk[names[0]])
    finally:
        grams.clear()
        kept.clear()
        for n, net in nets.items():
            net.train(modes[n])
    result.images_dropped = seen - result.images
    if result.images_dropped:
        log.info("similarity: %d images left over after %d minibatches of %d were not used",
                 result.images_dropped, acc.batches, result.batch_size)
    return result
