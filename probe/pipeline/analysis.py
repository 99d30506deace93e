"""What every analysis stage starts from: the run, its data, the device and the probe images."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from probe.pipeline.config import AnalysisStage, DataConfig
from probe.data import DataBundle, dataset_labels, load_data, probe_indices
from probe.pipeline.rundir import Run, load_run
from probe.runtime import pick_device, seed_everything


@dataclass
class Context:
    run: Run
    data: DataBundle
    device: torch.device
    dataset: Dataset  # the split (and limit) the stage reads
    labels: np.ndarray  # (N,) labels of `dataset`
    probe_index: np.ndarray  # (P,) indices into `dataset` of the fixed probe images
    probe_x: torch.Tensor  # (P, C, H, W) normalised probe images, on the CPU
    probe_y: torch.Tensor  # (P,) their labels


def data_config(card: dict) -> DataConfig:
    """The data config a run was trained with, from its card."""
    names = {f.name for f in fields(DataConfig)}
    return DataConfig(**{k: v for k, v in card["data"].items() if k in names})


def open_run(cfg: AnalysisStage) -> Context:
    """Seed, load the run and its data split, and pick the probe images (same for every model)."""
    seed_everything(cfg.seed, cfg.deterministic)
    run = load_run(cfg.run)
    data = load_data(data_config(run.card), run.card["model"]["in_channels"])
    ds = data.split(cfg.data.split)
    if cfg.data.limit is not None and cfg.data.limit < len(ds):
        ds = Subset(ds, list(range(cfg.data.limit)))
    labels = dataset_labels(ds)
    idx = probe_indices(labels, cfg.data.probe_per_class, cfg.seed)
    probe = [ds[int(i)] for i in idx]
    probe_x = torch.stack([p[0] for p in probe])
    probe_y = torch.as_tensor([int(p[1]) for p in probe])
    device = pick_device(cfg.device)
    run.model.to(device).eval()
    return Context(run, data, device, ds, labels, idx, probe_x, probe_y)
