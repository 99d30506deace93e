"""``probe init DIR``: a study of one's own, and what probe's commands do for the study they run in.

A study is a folder holding ``conf/model/<name>.yaml`` (its model configs), ``params.yaml`` (its runs and the few
settings people change) and ``dvc.yaml``: per run, train (or just load) -> activations, saliency, synthesize,
geometry, then one report over every run, each stage calling the installed ``probe`` (nothing of probe's code
is copied into the study). ``probe init`` writes it from ``templates/study/`` and runs ``git init`` and
``dvc init`` there.

Run in a folder with a ``conf/``, every ``probe <stage>`` finds configs there after its own (``model=mynet`` is
``conf/model/mynet.yaml``) and imports Python modules from that folder (``_target_: nets.mynet.Net``). This
repository's own default pipeline works the same way.

How a study notices that probe changed: ``params.yaml`` pins ``probe_version`` (the installed version, written by
``probe init``); every stage of the study lists it under ``params`` and runs ``probe --expect-version <it>``, which
refuses to run under any other probe. Results never mix two versions: after an upgrade, setting the new version
reruns every stage, and until then any stage that has to run stops with one line saying so. (A dependency on
probe's files would not do: an installed package lives outside the study, at a path that differs per machine.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from probe.errors import ConfigError

TEMPLATE = Path(__file__).with_name("templates") / "study"
DOTFILES = {"gitignore": ".gitignore", "dvcignore": ".dvcignore"}  # package data keeps no dotfiles
MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # a Hydra option and a Python module name


def installed_version() -> str:
    from importlib.metadata import version

    return version("probe")


def version_mismatch(expected: str) -> str | None:
    """``None`` when probe ``expected`` is installed, else the one-line reason (for ``--expect-version``)."""
    installed = installed_version()
    if expected == installed:
        return None
    return (f"--expect-version: '{expected}' (the study's probe_version in params.yaml) but probe {installed} is "
            f"installed; set probe_version: {installed} to rerun every stage with it, or install probe=={expected}")


class StudyConfigs(SearchPathPlugin):
    """Hydra's search path gets ``conf/`` of the folder probe runs in, when there is one: after probe's own
    configs, before ``hydra.searchpath`` and the ConfigStore (looked up whenever Hydra builds its search path)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        conf = Path.cwd() / "conf"
        if conf.is_dir():
            search_path.append(provider="probe study", path=f"file://{conf.as_posix()}")


def use_study_folder() -> None:
    """For the probe command about to run: the current folder's ``conf/`` on Hydra's search path
    (:class:`StudyConfigs`), and its modules importable as a script's neighbours are (``python -m`` puts the
    folder first on ``sys.path``, too)."""
    Plugins.instance().register(StudyConfigs)
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def write_study(folder: Path, model: str) -> list[Path]:
    """Write the study template into ``folder`` (new or empty), its example model named ``model``; return the
    files written. Raises :class:`ConfigError` for a folder that is not empty or a model name that is not valid."""
    if not MODEL_NAME.fullmatch(model):
        raise ConfigError(f"--model: '{model}' is not allowed; a letter, then letters, digits or '_'")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: is a file; probe init writes only into a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:5])
        raise ConfigError(f"{folder}: not empty (found {found}); probe init writes only into a new or empty folder")
    values = {"@MODEL@": model, "@PROBE_VERSION@": installed_version()}
    written = []
    for src in sorted(TEMPLATE.rglob("*")):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        rel = Path(*(_fill(part, values) for part in src.relative_to(TEMPLATE).parts))
        dest = folder / rel.parent / DOTFILES.get(rel.name, rel.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(_fill(src.read_text(), values))
        written.append(dest)
    return written


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def init_repositories(folder: Path) -> list[str]:
    """``git init`` (unless ``folder`` is inside a git work tree already) and ``dvc init`` (``--subdir`` inside
    a larger git repository, which then holds the study); returns the commands run."""
    done = []
    git = shutil.which("git") or "git"
    top = subprocess.run([git, "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    if top.returncode != 0:
        subprocess.run([git, "init", "-q"], cwd=folder, check=True)
        done.append("git init")
    inside = top.returncode == 0 and Path(top.stdout.strip()).resolve() != folder.resolve()
    dvc = [sys.executable, "-m", "dvc", "init", "-q"] + (["--subdir"] if inside else [])
    subprocess.run(dvc, cwd=folder, check=True)
    done.append("dvc init" + (" --subdir" if inside else ""))
    return done


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse prints its usage as well)
        raise ConfigError(message)


def main(argv: list[str]) -> int:
    """``probe init DIR [--model NAME] [--no-git]``."""
    parser = _Parser(prog="probe init", description="Write a study of your own into DIR (new or empty): "
                     "conf/model/<NAME>.yaml to fill in, params.yaml, dvc.yaml calling probe, README.md.")
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("--model", default="mynet", help="the example model config's name (default: mynet)")
    parser.add_argument("--no-git", action="store_true", help="write the files only (no git init, no dvc init)")
    try:
        args = parser.parse_args(argv)
        folder = Path(args.folder)
        if not args.no_git and shutil.which("git") is None:
            raise ConfigError("git: not found; install git, or give --no-git (then git init && dvc init yourself)")
        written = write_study(folder, args.model)
        done = [] if args.no_git else init_repositories(folder)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ConfigError as e:
        print(f"probe init: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"probe init: error: {' '.join(map(str, e.cmd[-3:]))} failed (exit {e.returncode}) in {folder}",
              file=sys.stderr)
        return 1
    steps = f"; {', '.join(done)}" if done else ""
    print(f"probe init: wrote {len(written)} files to {folder}{steps}\n"
          f"next: fill in {folder / 'conf' / 'model' / (args.model + '.yaml')}, put your code in nets/, weights in "
          f"weights/, images in images/<class>/; then: cd {folder} && dvc repro")
    return 0
