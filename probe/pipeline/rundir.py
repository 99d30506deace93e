"""The run dir: the contract between stages (see DESIGN.md).

Writes are atomic: a stage fills a temporary folder or file and renames it into place when it
has finished, so an interrupted stage leaves the previous complete output or none.
``card.json`` is written last and marks a run dir as complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

log = logging.getLogger(__name__)

CARD_VERSION = 1
# beside card.json: where and with what a run was made (git commit, library versions); not an
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
def file_lock(path: Path, shared: bool = False, what: str = "probe"):
    """Hold ``path`` as a lock for the block: exclusive, or ``shared`` with other shared holders (readers).

    An OS lock (``flock``), as DVC's run lock is: the kernel releases it when the holder exits or dies, so a
    lock is never stale. Taken without waiting: when another process holds it, :class:`RunDirError` names
    that process (an exclusive holder writes ``what``, its pid and host into the file, and removes the file
    when it is done; shared holders leave it)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another probe command reading it"
            os.close(fd)
            raise RunDirError(f"{path.parent}: in use by {holder}; wait for it to finish (lock {path.name})") from None
        try:  # the file we locked may have been removed by the holder before us: lock the one at `path`
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()})".encode(), 0)
        yield
    finally:
        if not shared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def weights_lock(run_dir: Path, write: bool, what: str):
    """``probe train`` holds a run dir's weights exclusively (``write``); an analysis holds them shared while it
    reads them, so a retraining never replaces the weights under a running analysis, nor the other way round.

    The lock is the run dir itself (``flock`` on the folder: no file is written, and the kernel releases it
    when the holder exits or dies). Where the file system has no such locks, commands run unserialised."""
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "an analysis reading its weights" if write else "probe train (retraining it)"
            raise RunDirError(f"{run_dir}: in use by {holder}; wait for it to finish ({what} needs it)") from None
        except OSError as e:  # e.g. a network file system without flock
            log.warning("%s: cannot lock (%s); not serialised with other probe commands", run_dir, e)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` as a whole.

    A process killed at any moment leaves ``final`` as it was (or, during the swap, in
    ``.<name>.old``, restored by the next call) and a temp folder that the next call removes."""
    final = Path(final)
    with file_lock(final.parent / f".{final.name}.lock", what=f"the probe command writing {final.name}/"):
        clean_stale(final)
        with _staged(final) as tmp:
            yield tmp


@contextlib.contextmanager
def _staged(final: Path):
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


WEIGHTS_KEY = "weights_sha256"  # in every analysis's metrics.json: the weights it was computed from


def weights_digest(run_dir: str | Path) -> str:
    """The first 16 hex digits of the SHA-256 of the run's ``model.safetensors``."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(run_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stamped(run_dir: str | Path, metrics: dict) -> dict:
    """An analysis's ``metrics``, recording the weights it read (see :func:`stale`)."""
    return {**metrics, WEIGHTS_KEY: weights_digest(run_dir)}


def stale(run_dir: str | Path, folder: str) -> str | None:
    """Why ``<run_dir>/<folder>/`` does not describe the run's current weights, or None when it does (or is
    absent, or predates the record)."""
    path = Path(run_dir) / folder / "metrics.json"
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text()).get(WEIGHTS_KEY)
    if recorded is None or not (Path(run_dir) / "model.safetensors").is_file():
        return None
    now = weights_digest(run_dir)
    if recorded == now:
        return None
    return f"{folder}/ was computed from other weights (sha256 {recorded}; the run's are {now})"


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


def find_run_dirs(runs: Sequence[str], sweep: str | None) -> list[Path]:
    """The run dirs ``runs`` names, then every folder with a ``card.json`` below ``sweep`` (a Hydra multirun
    dir or any folder of run dirs; hidden folders skipped), in path order."""
    paths = [Path(r) for r in runs]
    if sweep:
        root = Path(sweep)
        if not root.is_dir():
            raise RunDirError(f"sweep: {root} does not exist")
        found = sorted(p.parent for p in root.rglob("card.json") if not any(part.startswith(".") for part in p.parts))
        if not found:
            raise RunDirError(f"sweep: no run dirs (folders with card.json) under {root}")
        paths += found
    return paths


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Unique labels for run dirs: the folder's name; a repeated one qualified with its parent folder
    (``<parent>/<folder>``), and where that still repeats, the path as given. The report and the comparison
    label runs the same way."""
    labels = [Path(p).name for p in paths]
    for qualify in (lambda p: f"{Path(p).parent.name}/{Path(p).name}", str):
        labels = [qualify(p) if labels.count(label) > 1 else label for p, label in zip(paths, labels)]
    return labels


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
