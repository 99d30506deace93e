"""Model zoo: probe's own CNNs and every torchvision classifier, built by name."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from probe.models import small  # noqa: F401  (registers probe's models)
from probe.models.registry import ModelSpec, list_models, register_model, spec
from probe.errors import WeightsError
from probe.models.weights import hub_cache_only, load_into, read_state_dict, torchvision_weights

__all__ = ["ModelSpec", "WeightsError", "build", "list_models", "register_model", "spec", "is_weights_file"]


def is_weights_file(weights: str) -> bool:
    return Path(weights).suffix in (".safetensors", ".pt", ".pth", ".bin")


def build(
    name: str,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    weights: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build model ``name``.

    ``weights`` is a torchvision weights name (read from the torch hub cache, never downloaded)
    or a local ``.safetensors`` / ``.pt`` file (``.pt`` read with ``weights_only=True``).
    torchvision models keep 3 input channels (the data is converted); pretrained torchvision
    weights fix ``num_classes`` to theirs.
    """
    s = spec(name)
    if s.source == "probe":
        model = s.factory(in_channels=in_channels or s.channels, num_classes=num_classes or s.num_classes, **kwargs)
    else:
        import torchvision

        if weights is not None and not is_weights_file(weights):
            with hub_cache_only():
                return torchvision.models.get_model(name, weights=torchvision_weights(name, weights), **kwargs).eval()
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("aux_logits", False)
            kwargs.setdefault("init_weights", False)
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes or s.num_classes, **kwargs)
    if weights is not None:
        if not is_weights_file(weights):
            from probe.errors import ConfigError

            raise ConfigError(f"model.weights: '{weights}' is neither a weights file (.safetensors, .pt) nor torchvision weights of {name}")
        load_into(model, read_state_dict(weights), weights)
    return model.eval()
