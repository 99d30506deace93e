"""Train (or just initialise, with ``train.epochs=0``) one model and write its run dir."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from probe.pipeline.config import TrainStage
from probe.data import DataBundle, load_data
from probe.errors import ConfigError, NumericalError
from probe.models import spec
from probe.models.summary import layer_table
from probe.models.weights import load_into, read_state_dict
from probe.pipeline.model import build_model, card_section, model_input
from probe.pipeline.rundir import CARD_VERSION, ENVIRONMENT, git_commit, library_versions, remove_analyses, save_weights, weights_lock
from probe.files import write_bytes, write_json
from probe.runtime import autocast, fast_model, pick_device, pin_memory, seed_everything, to_device_batch

log = logging.getLogger(__name__)
TRAINING = ".training"  # inside the run dir: the run being trained, until it has finished
LOG_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


def loader(ds, batch_size: int, shuffle: bool, seed: int, device: torch.device, num_workers: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory(device))


@torch.no_grad()
def evaluate(model: nn.Module, dl: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``dl``."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in dl:
        x, y = to_device_batch(x, device), to_device_batch(y, device)
        out = model(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return (loss_sum / max(n, 1)).item(), correct.item() / max(n, 1)


@torch.no_grad()
def confusion_matrix(model: nn.Module, dl: DataLoader, device: torch.device, num_classes: int) -> tuple[list, list]:
    """Counts of (true class, predicted class) over ``dl``: row i, column j = images of class i predicted as j; and
    per true class, the images predicted as none of the data's classes (a pretrained head with more outputs)."""
    model.eval()
    k = num_classes
    counts = torch.zeros(k * (k + 1), dtype=torch.int64, device=device)
    for x, y in dl:
        x, y = to_device_batch(x, device), to_device_batch(y, device)
        pred = model(x).argmax(1).clamp(max=k)  # k: outside the data's classes
        counts += torch.bincount(y * (k + 1) + pred, minlength=k * (k + 1))
    m = counts.view(k, k + 1)
    return m[:, :k].tolist(), m[:, k].tolist()


def model_for(cfg: TrainStage) -> tuple[nn.Module, DataBundle, dict, dict]:
    """Build the model and its data so that input and classes agree: images of the model's input (size,
    channels, normalisation), labels in its class order. Returns the model, the data, the data's and the
    model's sections of the card."""
    m = cfg.model
    i = model_input(m, cfg.data)
    data_cfg = replace(cfg.data, image_size=i.size, channels=i.channels)
    data = load_data(data_cfg, i.channels, mean=i.mean, std=i.std, classes=m.classes)
    # named torchvision / timm weights come with their own classifier; every other model gets the data's classes
    pretrained = spec(m.source).source in ("torchvision", "timm") and m.weights is not None
    model = build_model(m, i.channels, i.size, None if pretrained else data.num_classes)
    model_card = card_section(m, model, data)
    if model_card["num_classes"] < data.num_classes:
        raise ConfigError(f"{m.where()}model: {m.name} returns {model_card['num_classes']} class scores, the data has "
                          f"{data.num_classes} classes ({', '.join(data.classes[:8])}{', ...' if data.num_classes > 8 else ''}); "
                          f"give the model as many (model.kwargs) or name its classes (model.classes)")
    return model, data, {**asdict(data_cfg), **data.card()}, model_card


def _optimizer(model: nn.Module, cfg: TrainStage) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def train(cfg: TrainStage) -> Path:
    """Train per ``cfg`` and write the run dir ``cfg.run_dir``; return its path.

    The new run is written into ``<run_dir>/.training/`` and replaces the run dir's files only when it has
    finished, so a failed retraining (NaN, an error) leaves the last complete run as it was; a killed or
    interrupted one leaves ``.training/`` for ``train.resume=true``."""
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.seed, cfg.deterministic)
    torch.set_num_threads(cfg.threads)  # from the config, never the launcher (probe/pipeline/config.py)
    device = pick_device(cfg.device)
    model, data, data_card, model_card = model_for(cfg)
    work = run_dir / TRAINING
    run_dir.mkdir(parents=True, exist_ok=True)
    with weights_lock(run_dir, write=True, what="probe train"):  # no analysis reads the weights meanwhile
        if not (cfg.train.resume and (work / "last_state.pt").is_file()):
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(exist_ok=True)
        try:
            test_acc = _train(cfg, model, data, data_card, model_card, device, run_dir, work)
        except KeyboardInterrupt:
            raise  # .training/ stays: train.resume=true continues from its last finished epoch
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _publish(work, run_dir)
    log.info("%s: test accuracy %.4f", run_dir, test_acc)
    return run_dir


def _publish(work: Path, run_dir: Path) -> None:
    """Replace the run dir's training outputs with those in ``work``: the old card goes first (from then on the
    run dir is incomplete), then the analyses of the old weights, and the new card comes last."""
    (run_dir / "card.json").unlink(missing_ok=True)
    stale = remove_analyses(run_dir)
    if stale:
        log.info("removed %s from %s: they described the weights this training replaced", ", ".join(stale), run_dir)
    shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
    for path in sorted(work.iterdir(), key=lambda p: p.name == "card.json"):
        os.replace(path, run_dir / path.name)
    work.rmdir()


def _train(cfg: TrainStage, model: nn.Module, data: DataBundle, data_card: dict, model_card: dict,
           device: torch.device, run_dir: Path, work: Path) -> float:
    """The training itself, writing every file into ``work``; returns the test accuracy."""
    write_bytes(work / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())

    model = fast_model(model, device)  # channels_last on CUDA
    opt = _optimizer(model, cfg)
    bs = cfg.data.batch_size
    train_dl = loader(data.train, bs, True, cfg.seed, device, cfg.data.num_workers)
    val_dl = loader(data.val, bs, False, cfg.seed, device, cfg.data.num_workers)
    test_dl = loader(data.test, bs, False, cfg.seed, device, cfg.data.num_workers)

    rows, start = [], 1
    state_path = work / "last_state.pt"
    if cfg.train.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        train_dl.generator.set_state(state["loader_rng"])
        rows = [dict(zip(LOG_COLUMNS, r.tolist())) for r in state["log"]]
        for r in rows:
            r["epoch"] = int(r["epoch"])
        start = len(rows) + 1
        log.info("resuming %s from epoch %d", run_dir, start)

    best_acc, best_path = -1.0, work / "model.safetensors"
    if rows:
        best_acc = max(r["val_acc"] for r in rows)
    if cfg.train.epochs == 0 or not best_path.is_file():
        save_weights(model, best_path)
    if start == 1 and 0 in cfg.train.snapshot_epochs:
        save_weights(model, work / "snapshots" / "epoch_0000.safetensors")
    show = cfg.progress and sys.stderr.isatty()
    for epoch in range(start, cfg.train.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        n = 0
        for x, y in tqdm(train_dl, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not show, leave=False):
            x, y = to_device_batch(x, device), to_device_batch(y, device)
            with autocast(device, cfg.train.amp):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            n += len(y)
        train_loss = (loss_sum / n).item()
        if not torch.isfinite(torch.tensor(train_loss)):
            raise NumericalError(f"train: loss is {train_loss} in epoch {epoch} of {run_dir} (lower train.lr?)")
        val_loss, val_acc = evaluate(model, val_dl, device)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / n, "val_loss": val_loss, "val_acc": val_acc}
        rows.append(row)
        log.info("epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f", epoch, *list(row.values())[1:])
        if val_acc > best_acc:
            best_acc = val_acc
            save_weights(model, best_path)
        if epoch in cfg.train.snapshot_epochs:
            save_weights(model, work / "snapshots" / f"epoch_{epoch:04d}.safetensors")
        _save_state(state_path, model, opt, rows, train_dl.generator)
    _write_log(work / "train_log.csv", rows)

    # evaluate the kept (best) weights
    load_into(model, read_state_dict(best_path), str(best_path))
    model.to(device)
    test_loss, test_acc = evaluate(model, test_dl, device)
    confusion, outside = confusion_matrix(model, test_dl, device, data.num_classes)
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "val_acc": max([r["val_acc"] for r in rows], default=None),
               "epochs": len(rows), "params_total": sum(p.numel() for p in model.parameters())}
    write_json(work / "metrics.json", metrics)
    model.cpu()
    card = {
        "card_version": CARD_VERSION,
        "run_name": run_dir.resolve().name,
        "model": model_card,
        "data": data_card,
        "params_total": metrics["params_total"],
        "layers": [r.as_dict() for r in layer_table(model, data.channels, data.image_size)],
        "metrics": metrics,
        # the kept weights on the test split, for the report's per-class accuracy and confusion matrix
        "evaluation": {"split": "test", "confusion": confusion, "predicted_outside": outside},
        "seed": cfg.seed,
        "train": asdict(cfg.train),
    }
    # where and with what the run was made, which DVC must not hash (a fresh clone on another machine
    # reproduces dvc.lock): the commit and library versions (the thread count is config: `threads`)
    # the CPU's vector instruction set too: oneDNN and ATen pick kernels by it, so the same seed gives other float
    # bits on a CPU with another one (AVX2 vs AVX-512)
    write_json(work / ENVIRONMENT, {"git_commit": git_commit(), "versions": library_versions(),
                                    "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    state_path.unlink(missing_ok=True)
    write_json(work / "card.json", card)
    return test_acc


def _save_state(path: Path, model, opt, rows, loader_rng: torch.Generator) -> None:
    """Everything needed to resume after the last finished epoch (read back with weights_only=True)."""
    log_t = torch.tensor([[r[c] for c in LOG_COLUMNS] for r in rows], dtype=torch.float64)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "loader_rng": loader_rng.get_state(), "log": log_t}, buf)
    write_bytes(path, buf.getvalue())


def _write_log(path: Path, rows) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_bytes(path, buf.getvalue().encode())
