"""Device choice, seeding and determinism."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from probe.errors import ConfigError

        raise ConfigError("device: 'cuda' requested but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some CUDA backward kernels (interpolation, adaptive pooling) have no
        # deterministic variant; warn there rather than crash
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


# -- the device policy of the hot loops (activations pass, training): one place --------------------------
def fast_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``; on CUDA in channels_last memory format (faster cuDNN convolutions, tensor cores).

    On the CPU the model is only moved (memory format unchanged): a no-op for a model already there.
    """
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device`` without a host sync: non-blocking copy (from pinned memory), channels_last on CUDA.

    On the CPU, a CPU tensor is returned as it is.
    """
    if device.type != "cuda":
        return x.to(device)
    if x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled`` (and the GPU supports bf16); a no-op context elsewhere.

    Only forward passes whose outputs feed float32/float64 accumulators use it (the statistics pass
    converts every captured output to float32 first); gradients for saliency stay in float32.
    """
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin_memory(device: torch.device) -> bool:
    """DataLoader ``pin_memory``: on CUDA only (page-locked host buffers make non-blocking copies asynchronous)."""
    return device.type == "cuda"
