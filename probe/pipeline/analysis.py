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


def run_data(card: dict) -> DataBundle:
    """The data a run was trained on, as its model takes it: the recorded size, channels and normalisation,
    labels in the model's class order."""
    m = card["model"]
    i = m.get("input") or {}  # cards written before model inputs were recorded: the data config's own recipe
    return load_data(data_config(card), m["in_channels"], mean=i.get("mean"), std=i.get("std"), classes=m.get("classes"))


def open_run(cfg: AnalysisStage) -> Context:
    """Seed, load the run (importing a model's code only when trusted: :func:`probe.pipeline.model.rebuild`)
    and its data split (``all``: every image), and pick the probe images (same for every model)."""
    seed_everything(cfg.seed, cfg.deterministic)
    torch.set_num_threads(cfg.threads)  # from the config, never the launcher (probe/pipeline/config.py)
    run = load_run(cfg.run, trust=cfg.trust)
    data = run_data(run.card)
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
