"""Training dynamics from the checkpoints kept with ``train.snapshot_epochs``: first-layer filters,
and per ReLU the share of zero activations (sparsity) and of channels never active (dead) on the
probe images."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from probe.hooks import batched_layer_outputs, first_conv
from probe.models.weights import load_into, read_state_dict

SNAPSHOT = re.compile(r"epoch_(\d+)\.safetensors$")


def snapshot_paths(run_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``<run>/snapshots/epoch_XXXX.safetensors``, by epoch."""
    found = [(int(m.group(1)), p) for p in sorted((Path(run_dir) / "snapshots").glob("epoch_*.safetensors"))
             if (m := SNAPSHOT.search(p.name))]
    return sorted(found)


def relu_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]


def activity(acts: dict[str, torch.Tensor], layers: list[str]) -> list[dict]:
    """Per layer: sparsity (share of zero outputs) and dead fraction (share of channels zero everywhere)."""
    rows = []
    for depth, n in enumerate(layers):
        y = acts[n]
        per_channel = y.transpose(0, 1).reshape(y.shape[1], -1)
        rows.append({"layer": n, "depth": depth, "channels": int(y.shape[1]),
                     "sparsity": float((y == 0).float().mean()),
                     "dead_fraction": float((per_channel == 0).all(1).float().mean())})
    return rows


def dynamics_table(model: nn.Module, x: torch.Tensor, snapshots: list[tuple[int, Path]], batch_size: int = 128,
                   device: torch.device | str = "cpu") -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Rows (epoch, layer, depth, channels, sparsity, dead_fraction) and first-layer filters per epoch
    (``{"epoch_XXXX": (out, in, k, k)}``). ``model`` itself is left untouched."""
    model = copy.deepcopy(model)
    layers, conv = relu_layers(model), first_conv(model)
    rows, filters = [], {}
    for epoch, path in snapshots:
        load_into(model, read_state_dict(path), str(path))
        model.to(device).eval()
        if layers:
            _, acts = batched_layer_outputs(model, x, layers, batch_size, device)
            rows += [{"epoch": epoch, **r} for r in activity(acts, [n for n in layers if n in acts])]
        if conv is not None:
            filters[f"epoch_{epoch:04d}"] = dict(model.named_modules())[conv].weight.detach().float().cpu().numpy()
    cols = ["epoch", "layer", "depth", "channels", "sparsity", "dead_fraction"]
    return pd.DataFrame(rows, columns=cols), filters


def snapshot_images(model: nn.Module, snapshots: list[tuple[int, Path]], layer: str, channels: list[int],
                    in_channels: int, size: int, mean, std, steps: int, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Per snapshot, synthetic images ``(len(channels), C, H, W)`` in [0, 1] maximising ``channels`` of
    ``layer``, from the same initial parameters at every epoch (so differences come from the weights),
    and the activation each reaches (spatial mean) in a table (epoch, layer, channel, activation)."""
    from probe.synthesis import objectives as O
    from probe.synthesis.param import ImageParam
    from probe.synthesis.render import render

    model = copy.deepcopy(model)
    images, rows = {}, []
    for epoch, path in snapshots:
        load_into(model, read_state_dict(path), str(path))
        model.to(device).eval()
        param = ImageParam(len(channels), in_channels, size, kind="fourier", seeds=list(channels), device=device)
        res = render(model, O.channel(layer, channels, "mean"), param, steps=steps, mean=mean, std=std, seed=0,
                     redirect_relu_steps=steps // 4, labels=[f"epoch {epoch} {layer} channel {c}" for c in channels])
        images[f"epoch_{epoch:04d}"] = res.pixels.numpy()
        for i, c in enumerate(channels):
            rows.append({"epoch": epoch, "layer": layer, "channel": c, "activation": float(res.objective[i])})
    return images, pd.DataFrame(rows, columns=["epoch", "layer", "channel", "activation"])
