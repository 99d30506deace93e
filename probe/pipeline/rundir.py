"""The run dir: the contract between stages (see DESIGN.md).

Writes are atomic: a stage fills a temporary folder or file and renames it into place when it
has finished, so an interrupted stage leaves the previous complete output or none.
``card.json`` is written last and marks a run dir as complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch.nn as nn
from safetensors.torch import save_file

from probe.errors import RunDirError
from probe.files import dir_mode, file_mode
from probe.pipeline.stages import SHARDS_DIR, run_dir_folders  # noqa: F401  (SHARDS_DIR re-exported)

CARD_VERSION = 1
# beside card.json: where and with what a run was made (git commit, library versions, torch threads); not an
# output DVC hashes, so that outputs depend on the config and the seed only
ENVIRONMENT = "environment.json"
CARD_KEYS = ("card_version", "run_name", "model", "data", "params_total", "layers", "metrics", "seed")


def save_weights(model: nn.Module, path: Path) -> None:
    """Save a state dict as safetensors, atomically (shared tensors are cloned apart)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)  # writes a new file: its mode is set after
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _owner_alive(tmp: Path, name: str) -> bool:
    """Whether the process that made temp folder ``.<name>.<host>-<pid>.<random>.tmp`` may still run."""
    m = re.fullmatch(rf"\.{re.escape(name)}\.(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.tmp", tmp.name)
    if m is None or m["host"] != socket.gethostname():
        return True  # another machine's, or an older naming: leave it alone
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> None:
    """Remove what interrupted stages left beside ``final``: temp folders of processes that no longer
    run, and restore ``.<name>.old`` (the previous complete output) when a swap was cut short."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        if tmp.is_dir() and not _owner_alive(tmp, final.name):
            shutil.rmtree(tmp, ignore_errors=True)
    old = final.parent / f".{final.name}.old"
    if old.is_dir() and not final.exists():
        os.replace(old, final)


def remove_analyses(run_dir: Path) -> list[str]:
    """Remove what the stages wrote into ``run_dir``, all computed from its weights (before they are replaced);
    return the folders' names."""
    gone = [name for name in run_dir_folders() if (Path(run_dir) / name).exists()]
    for name in gone:
        shutil.rmtree(Path(run_dir) / name)
    return gone


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` as a whole.

    A process killed at any moment leaves ``final`` as it was (or, during the swap, in
    ``.<name>.old``, restored by the next call) and a temp folder that the next call removes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{socket.gethostname()}-{os.getpid()}.",
                                suffix=".tmp"))
    tmp.chmod(dir_mode())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_card(run_dir: str | Path) -> dict:
    """``card.json`` of a complete run dir, checked for the keys and version this probe reads."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: run dir does not exist")
    path = run_dir / "card.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run dir (no card.json; run `probe train run_dir={run_dir}` first)")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in CARD_KEYS if k not in card] if isinstance(card, dict) else list(CARD_KEYS)
    if missing:
        raise RunDirError(f"{path}: missing keys {', '.join(missing)}")
    if card["card_version"] != CARD_VERSION:
        raise RunDirError(f"{path}: card_version {card['card_version']} is not supported; this probe reads version {CARD_VERSION}")
    return card


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import captum
    import numpy
    import torch
    import torchvision

    from probe import __version__

    return {"probe": __version__, "torch": torch.__version__.split("+")[0],
            "torchvision": torchvision.__version__.split("+")[0], "captum": captum.__version__, "numpy": numpy.__version__}


@dataclass
class Run:
    """A loaded run: its folder, card and model (eval mode, on the CPU)."""

    path: Path
    card: dict
    model: nn.Module

    @property
    def name(self) -> str:
        return self.card["run_name"]


def load_run(run_dir: str | Path, trust: Sequence[str] = ()) -> Run:
    """The run in ``run_dir``, its model rebuilt from the card with the run's weights. A card whose model is
    built by an import path is refused unless the current study configures it or ``trust`` names it
    (:func:`probe.pipeline.model.rebuild`)."""
    from probe.pipeline.model import rebuild

    run_dir = Path(run_dir)
    card = read_card(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise RunDirError(f"{run_dir}: card.json present but model.safetensors missing")
    model = rebuild(card, str(run_dir / "card.json"), weights=str(weights), trust=trust)
    return Run(run_dir, card, model)
