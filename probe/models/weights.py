"""Loading weights without ever unpickling code.

* probe checkpoints are safetensors;
* torchvision weights come from the torch hub cache, read with ``torch.load(weights_only=True)``
  (torchvision itself would call ``load_state_dict_from_url``, which unpickles
  without the weights-only guard and downloads when the file is missing);
* a foreign ``.pt``/``.pth`` file is read with ``weights_only=True`` only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from probe.errors import WeightsError


WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def is_weights_file(weights: str) -> bool:
    """Whether ``weights`` names a local file (by its suffix) rather than named weights (``DEFAULT`` ...)."""
    return Path(weights).suffix in WEIGHTS_SUFFIXES


def hub_checkpoint_path(url: str) -> Path:
    """Where torch hub keeps the file for ``url`` (``$TORCH_HOME/hub/checkpoints/<name>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or (weights only) from a torch pickle."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        # torch raises UnpicklingError (a subclass of RuntimeError-like pickle errors) for code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: cannot be read safely ({type(e).__name__}: {first})") from None
    except Exception as e:  # pickle.UnpicklingError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: refused, not a plain weights file ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, naming the first missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    for key, expected in own.items():  # in the model's order, so "first" means first layer
        if key in state and state[key].shape != expected.shape:
            raise WeightsError(
                f"{source}: tensor '{key}' has shape {tuple(state[key].shape)}, the model expects {tuple(expected.shape)}"
            )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
        raise WeightsError(f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    model.load_state_dict(state)


@contextlib.contextmanager
def hub_cache_only():
    """Make torchvision's weight loading read the hub cache with ``weights_only=True`` and never download."""
    import torchvision.models._api as api

    def load_from_cache(url, *args, **kwargs):
        path = hub_checkpoint_path(url)
        if not path.is_file():
            raise WeightsError(
                f"{path}: torchvision weights not found in the torch hub cache; on a machine with internet "
                f"download {url} and copy it to {path.parent}/ (or set TORCH_HOME)"
            )
        return read_state_dict(path)

    original = api.load_state_dict_from_url
    api.load_state_dict_from_url = load_from_cache
    try:
        yield
    finally:
        api.load_state_dict_from_url = original


def torchvision_weights(model_name: str, weights: str):
    """The torchvision ``WeightsEnum`` member for ``weights`` ("DEFAULT", "IMAGENET1K_V1", or a full name)."""
    import torchvision

    from probe.errors import ConfigError, check_choice

    enum = torchvision.models.get_model_weights(model_name)
    name = weights.split(".")[-1]
    if name == "DEFAULT":
        return enum.DEFAULT
    check_choice("model.weights", name, [w.name for w in enum] + ["DEFAULT"])
    if "." in weights and weights.split(".")[0] != enum.__name__:
        raise ConfigError(f"model.weights: '{weights}' are not weights of {model_name}; allowed: {enum.__name__}.*")
    return enum[name]
