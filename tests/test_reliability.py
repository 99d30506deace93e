"""Reliability (issue 8): bad input gets one clear line and writes nothing; bad files are named and
never run code; NaN/Inf is never written as a result; a stage killed with SIGKILL leaves the previous
complete output (or none) and reruns cleanly; same seed, same bytes; the report escapes what it shows;
memory stays flat over 50,000 images; a parallel sweep gives complete, distinct run dirs."""

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.pipeline.cli import main
from probe.errors import RunDirError
from probe.pipeline.rundir import read_card
from probe.pipeline.stages import STAGES

from conftest import CHEAP, TINY_TRAIN, make_run

ANALYSES = tuple(CHEAP)  # activations, saliency, synthesize, geometry
OUTPUT = {stage: STAGES[stage].output for stage in ANALYSES}
TRAINED_FILES = ("card.json", "config.yaml", "metrics.json", "model.safetensors", "train_log.csv")
PLAIN = "import sys; from probe.pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny run dir without analyses (tests copy it before changing anything)."""
    return make_run(tmp_path_factory.mktemp("reliability") / "tiny", stages=())


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def copy_run(src: Path, dst: Path, with_outputs: bool = True) -> Path:
    if with_outputs:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs"))
    else:
        dst.mkdir(parents=True)
        for f in TRAINED_FILES:
            shutil.copy2(src / f, dst / f)
    return dst


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- bad configuration and arguments: exit 2, one line naming the key and what is allowed, nothing written --

BAD = [
    # unknown key, wrong type, out-of-range number, unknown name (closest suggested): every stage
    ("train", ["data.image_sise=16"], "data.image_sise", "did you mean 'image_size'"),
    ("train", ["seed=x"], "seed", "Integer"),
    ("train", ["data.image_size=4"], "data.image_size", ">= 8"),
    ("train", ["data.name=digitz"], "data.name", "did you mean 'digits'"),
    ("train", ["model=tiny_cn"], "model", "did you mean 'tiny_cnn'"),
    ("activations", ["activations.top_kk=3"], "activations.top_kk", "did you mean 'top_k'"),
    ("activations", ["activations.top_k=many"], "activations.top_k", "Integer"),
    ("activations", ["activations.hist_bits=9"], "activations.hist_bits", "<= 8"),
    ("activations", ["activations.layers=[conv_1]"], "activations.layers", "did you mean 'conv1'"),
    ("activations", ["activations.feature_map_layers=[fcc]"], "activations.feature_map_layers", "did you mean 'fc'"),
    ("saliency", ["saliency.ig_step=4"], "saliency.ig_step", "did you mean 'ig_steps'"),
    ("saliency", ["saliency.ig_steps=1.5"], "saliency.ig_steps", "Integer"),
    ("saliency", ["saliency.smoothgrad_noise=2"], "saliency.smoothgrad_noise", "<= 1"),
    ("saliency", ["saliency.methods=[gradcam]"], "saliency.methods", "did you mean 'grad_cam'"),
    ("saliency", ["saliency.gradcam_layer=conv_2"], "saliency.gradcam_layer", "did you mean 'conv2'"),
    ("synthesize", ["synthesis.step=4"], "synthesis.step", "did you mean 'steps'"),
    ("synthesize", ["synthesis.lr=fast"], "synthesis.lr", "Float"),
    ("synthesize", ["synthesis.lr=0"], "synthesis.lr", "> 0"),
    ("synthesize", ["synthesis.layers=[conv_1]"], "synthesis.layers", "did you mean 'conv1'"),
    ("synthesize", ["synthesis.dream.layer=conv_2"], "synthesis.dream.layer", "did you mean 'conv2'"),
    ("geometry", ["geometry.erf.mas=0.5"], "geometry.erf.mas", "did you mean 'mass'"),
    ("geometry", ["geometry.erf.mass=most"], "geometry.erf.mass", "Float"),
    ("geometry", ["geometry.erf.mass=0"], "geometry.erf.mass", "> 0"),
    ("geometry", ["geometry.layers=[fcc]"], "geometry.layers", "did you mean 'fc'"),
    ("geometry", ["geometry.shift.modes=[wrap]"], "geometry.shift.modes", "allowed: circular, zero"),
    ("report", ["unit=3"], "unit", "did you mean 'units'"),
    ("report", ["images=all"], "images", "Integer"),
    ("report", ["units=-1"], "units", ">= 0"),
    ("report", ["name=a/b"], "name", "use letters"),
]


def _args(stage: str, run: Path, tmp_path: Path) -> list[str]:
    if stage == "train":
        return [*TINY_TRAIN, f"run_dir={tmp_path / 'new_run'}"]
    if stage == "report":
        return [f"runs=[{run}]", f"out_dir={tmp_path / 'reports'}"]
    return [f"run={run}", *CHEAP[stage]]


@pytest.mark.parametrize("stage,overrides,key,hint", BAD, ids=[f"{b[0]}:{b[1][0]}" for b in BAD])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(stage, overrides, key, hint, trained, tmp_path,
                                                            capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Hydra's own output folders would land here
    before = files(trained)
    assert main([stage, *_args(stage, trained, tmp_path), *overrides]) == 2
    line = one_error_line(capsys)
    assert f"probe {stage}: error: {key}" in line and hint in line, line
    assert files(trained) == before and not (trained / "logs").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", [*ANALYSES, "report"])
@pytest.mark.parametrize("where,hint", [("missing", "does not exist"), ("not_a_run", "not a run dir")])
def test_a_run_dir_that_does_not_exist_or_is_not_one_exits_2(stage, where, hint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / where
    if where == "not_a_run":
        target.mkdir()
        (target / "notes.txt").write_text("not a run")
    arg = f"runs=[{target}]" if stage == "report" else f"run={target}"
    assert main([stage, arg]) == 2
    line = one_error_line(capsys)
    assert str(target) in line and hint in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["not_a_run", "notes.txt"] if where == "not_a_run" else [])


@pytest.mark.parametrize("stage,args,hint", [
    ("activations", [], "run: "),  # run= not given
    ("report", [], "runs: no runs to report"),
    ("report", ["sweep=."], "no run dirs"),
])
def test_missing_targets_exit_2(stage, args, hint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([stage, *args]) == 2
    assert hint in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_with_one_bad_value_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-m", *TINY_TRAIN, "seed=0,1,-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == 2
    assert "seed: -3 is out of range" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


# --- bad files: a clear error naming the file, no code run, nothing half-written ---------------------------

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _weights_error(run: Path, capsys, *needles: str) -> None:
    assert main(["activations", f"run={run}", *CHEAP["activations"]]) == 2  # the user can fix the file
    line = one_error_line(capsys)
    assert all(n in line for n in needles), line
    assert not (run / "activations").exists() and not list(run.glob(".activations.*"))


def test_a_pickle_posing_as_safetensors_in_a_run_dir_never_runs(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = copy_run(trained, tmp_path / "run", with_outputs=False)
    marker = tmp_path / "pwned"
    (run / "model.safetensors").write_bytes(pickle.dumps({"conv1.weight": _Evil(marker)}))
    _weights_error(run, capsys, str(run / "model.safetensors"))
    assert not marker.exists()


def test_a_truncated_safetensors_in_a_run_dir_is_named(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = copy_run(trained, tmp_path / "run", with_outputs=False)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    _weights_error(run, capsys, str(run / "model.safetensors"), "cannot be read")


def test_weights_of_other_shapes_name_the_first_mismatching_tensor(trained, tmp_path, capsys, monkeypatch):
    from probe.models import build
    from probe.pipeline.rundir import save_weights

    monkeypatch.chdir(tmp_path)
    run = copy_run(trained, tmp_path / "run", with_outputs=False)
    save_weights(build("tiny_cnn", in_channels=3, num_classes=10), run / "model.safetensors")
    _weights_error(run, capsys, str(run / "model.safetensors"), "'conv1.weight' has shape (4, 3, 3, 3)", "(4, 1, 3, 3)")


@pytest.mark.parametrize("change,hint", [
    (lambda c: c.pop("layers"), "missing keys layers"),
    (lambda c: c.pop("model") and c.pop("seed"), "missing keys model, seed"),
    (lambda c: c.update(card_version=99), "card_version 99 is not supported"),
])
def test_a_bad_card_is_refused_naming_the_file(change, hint, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = copy_run(trained, tmp_path / "run", with_outputs=False)
    card = json.loads((run / "card.json").read_text())
    change(card)
    (run / "card.json").write_text(json.dumps(card))
    for stage in ANALYSES:
        assert main([stage, f"run={run}"]) == 2
        line = one_error_line(capsys)
        assert str(run / "card.json") in line and hint in line, line
    assert main(["report", f"runs=[{run}]", f"out_dir={tmp_path / 'reports'}"]) == 2
    assert hint in one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == sorted(TRAINED_FILES)


def _folder(root: Path, classes: dict[str, list], size=(12, 12)) -> Path:
    for c, images in classes.items():
        (root / c).mkdir(parents=True)
        for i, img in enumerate(images):
            img.save(root / c / f"{i}.png")
    return root


def _img(value: int, mode="RGB", size=(12, 12)) -> Image.Image:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(np.full(shape, value, np.uint8), mode=mode)


def test_an_image_folder_reports_every_bad_entry_by_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _folder(tmp_path / "imgs", {"a": [_img(10 * i) for i in range(4)], "b": [_img(5 * i) for i in range(4)]})
    (root / "empty").mkdir()
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "b" / "readme.txt").write_text("labels are folder names")
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "data=imagefolder", f"data.root={root}", f"run_dir={run}"]) == 2
    line = one_error_line(capsys)
    for bad in (root / "empty", root / "a" / "corrupt.png", root / "b" / "readme.txt"):
        assert str(bad) in line, line
    assert "3 bad entries" in line and not run.exists()


def test_greyscale_in_rgb_folder_is_converted_and_counted_and_sizes_are_unified(tmp_path, caplog):
    from probe.pipeline.config import DataConfig
    from probe.data import load_data

    grey = [_img(30 * i, "L", (9 + i, 14)) for i in range(3)]
    colour = [_img(20 * i, "RGB", (20, 7 + i)) for i in range(5)]
    root = _folder(tmp_path / "imgs", {"x": colour[:3] + grey[:1], "y": colour[3:] + grey[1:]})
    with caplog.at_level(logging.INFO, logger="probe.data"):
        d = load_data(DataConfig(name="imagefolder", root=str(root), image_size=16, val_fraction=0.25,
                                 test_fraction=0.25), 3)
    assert any(f"{root}: 3 of 8 images converted to RGB" in r.getMessage() for r in caplog.records), caplog.text
    assert d.notes["converted_to_RGB"] == 3
    pixels = [x for split in (d.train, d.val, d.test) for x, _ in split]
    assert len(pixels) == 8 and all(x.shape == (3, 16, 16) for x in pixels)
    greys = [x for x in pixels if torch.equal(x[0] * d.std[0] + d.mean[0], x[1] * d.std[1] + d.mean[1])]
    assert len(greys) >= 3  # converted greyscale images have three equal channels


# --- numerical trouble: detected, located, and the stage's previous output survives ---------------------

def test_nan_in_attributions_is_located_and_the_previous_output_survives(complete_runs, tmp_path, capsys,
                                                                          monkeypatch):
    import probe.saliency.methods as methods

    monkeypatch.chdir(tmp_path)
    run = copy_run(complete_runs[0], tmp_path / "run")
    before = files(run / "saliency")
    real = methods.METHODS["saliency"]

    def poisoned(model, x, target, s):
        a = real(model, x, target, s)
        a[2, 0, 3, 3] = float("nan")
        return a

    monkeypatch.setitem(methods.METHODS, "saliency", poisoned)
    assert main(["saliency", f"run={run}", *CHEAP["saliency"]]) == 1
    line = one_error_line(capsys)
    assert "NaN/Inf" in line and "saliency: map rows [2]" in line, line
    assert files(run / "saliency") == before and not list(run.glob(".saliency.*"))


def test_nan_in_synthesis_is_located_and_the_previous_output_survives(complete_runs, tmp_path, capsys,
                                                                       monkeypatch):
    import probe.synthesis.objectives as O

    monkeypatch.chdir(tmp_path)
    run = copy_run(complete_runs[0], tmp_path / "run")
    before = files(run / "synthesis")
    real = O.channel
    calls = {"n": 0}

    def poisoned(layer, channels, kind="mean"):
        obj = real(layer, channels, kind)
        inner = obj.fn

        def fn(acts, x):
            v = inner(acts, x)
            calls["n"] += 1
            if layer == "conv2" and calls["n"] >= 3:  # third step of conv2's batch
                v = v.clone()
                v[5] = float("inf") * 0
            return v

        obj.fn = fn
        return obj

    monkeypatch.setattr(O, "channel", poisoned)
    assert main(["synthesize", f"run={run}", *CHEAP["synthesize"], "synthesis.layers=[conv2]"]) == 1
    line = one_error_line(capsys)
    assert "is nan for layer conv2 channel 5 at step 2" in line, line
    assert files(run / "synthesis") == before and not list(run.glob(".synthesis.*"))


# --- interruption: SIGKILL mid-stage leaves the previous complete output or none; a rerun completes ------

# The child holds every stage in its temp folder, with everything written, for a minute before the
# rename: the worst moment to die. Stage modules import staged_dir by name, so patch it first.
SLOW_STAGED_DIR = textwrap.dedent("""
    import contextlib, sys, time
    import probe.pipeline.rundir as rd
    real = rd.staged_dir
    @contextlib.contextmanager
    def slow(final):
        with real(final) as tmp:
            yield tmp
            (tmp / ".written").write_text("")
            time.sleep(60)
    rd.staged_dir = slow
    from probe.pipeline.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _kill_when(args: list[str], ready, cwd: Path, script: str = SLOW_STAGED_DIR, timeout: float = 90,
               sig: int = signal.SIGKILL, code: int = -signal.SIGKILL) -> str:
    """Run ``probe <args>`` in a subprocess, send ``sig`` once ``ready()``, check its exit ``code``; its stderr."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the stage"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == code, err[-2000:]
    return err


def _staged(parent: Path, name: str):
    return lambda: any((t / ".written").exists() for t in parent.glob(f".{name}.*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ANALYSES)
def test_sigkill_mid_stage_keeps_the_previous_output_and_a_rerun_completes(stage, complete_runs, tmp_path):
    run = copy_run(complete_runs[0], tmp_path / "run")
    out = run / OUTPUT[stage]
    before = files(out)
    args = [stage, f"run={run}", *CHEAP[stage]]
    _kill_when(args, _staged(run, OUTPUT[stage]), tmp_path)
    assert files(out) == before  # the previous complete output, byte for byte
    assert len(list(run.glob(f".{OUTPUT[stage]}.*.tmp"))) == 1  # the dead stage's temp folder
    assert main(args) == 0
    assert (out / "metrics.json").is_file() and not list(run.glob(f".{OUTPUT[stage]}.*"))  # stale temp removed


@pytest.mark.slow
def test_ctrl_c_mid_stage_exits_130_with_one_line_and_leaves_the_previous_output(complete_runs, tmp_path):
    run = copy_run(complete_runs[0], tmp_path / "run")
    before = files(run / "activations")
    err = _kill_when(["activations", f"run={run}", *CHEAP["activations"]], _staged(run, "activations"), tmp_path,
                     sig=signal.SIGINT, code=130)
    lines = [line for line in err.splitlines() if line.strip() and "][" not in line]  # without Hydra's log lines
    assert lines == ["probe activations: interrupted; the outputs of this command were not written"], err[-2000:]
    assert "Traceback" not in err
    assert files(run / "activations") == before and not list(run.glob(".activations.*"))  # temp folder removed


@pytest.mark.slow
def test_sigkill_of_a_first_activations_run_leaves_none_and_the_report_is_not_fooled(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run", with_outputs=False)
    _kill_when(["activations", f"run={run}", *CHEAP["activations"]], _staged(run, "activations"), tmp_path)
    assert not (run / "activations").exists()
    leftover = next(run.glob(".activations.*.tmp"))
    assert (leftover / "stats.parquet").is_file()  # complete-looking, but hidden from every reader
    assert main(["report", f"runs=[{run}]", f"out_dir={tmp_path / 'reports'}", "name=r"]) == 0
    numbers = json.loads((tmp_path / "reports" / "r" / "report.json").read_text())
    assert "activations" not in numbers["runs"][0]["metrics"] and "distributions" in numbers["missing"]


@pytest.mark.slow
def test_sigkill_mid_report_keeps_the_previous_report(complete_runs, tmp_path):
    args = ["report", f"runs=[{complete_runs[0]}]", f"out_dir={tmp_path / 'reports'}", "name=r"]
    assert main(args) == 0
    before = files(tmp_path / "reports" / "r")
    _kill_when(args, _staged(tmp_path / "reports", "r"), tmp_path)
    assert files(tmp_path / "reports" / "r") == before
    assert main(args) == 0 and files(tmp_path / "reports" / "r") == before
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["r"]


@pytest.mark.slow
def test_sigkill_mid_training_leaves_no_card_and_resume_gives_the_uninterrupted_weights(tmp_path):
    from safetensors.torch import load_file

    common = [*TINY_TRAIN[:-2], "train.epochs=4", "progress=false"]
    ref = tmp_path / "ref"
    assert main(["train", *common, f"run_dir={ref}", f"hydra.run.dir={tmp_path / 'logs'}"]) == 0
    run = tmp_path / "run"
    args = ["train", *common, f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"]
    _kill_when(args, lambda: (run / ".training" / "last_state.pt").is_file(), tmp_path, script=PLAIN)
    assert not (run / "card.json").exists()
    with pytest.raises(RunDirError, match="not a run dir"):
        read_card(run)
    assert main(["activations", f"run={run}"]) == 2  # no later stage reads a half-trained run
    assert main([*args, "train.resume=true"]) == 0
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / "train_log.csv").read_bytes() == (run / "train_log.csv").read_bytes()


def test_an_interrupted_swap_restores_the_previous_output(tmp_path):
    from probe.pipeline.rundir import staged_dir

    final = tmp_path / "activations"
    with staged_dir(final) as tmp:
        (tmp / "stats.parquet").write_text("complete")
    os.replace(final, tmp_path / ".activations.old")  # killed between the two renames of the swap
    with pytest.raises(RuntimeError), staged_dir(final):
        assert (final / "stats.parquet").read_text() == "complete"  # restored before anything else
        raise RuntimeError("this run fails too")
    assert (final / "stats.parquet").read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["activations"]


def test_python_dash_m_probe_works(tmp_path):
    out = subprocess.run([sys.executable, "-m", "probe", "trian"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "did you mean 'train'" in out.stderr


# --- determinism: same config and seed, same bytes ---------------------------------------------------------

@pytest.mark.slow
def test_same_seed_gives_the_same_bytes_in_another_run_dir(complete_runs, tmp_path):
    original = complete_runs[0]
    again = copy_run(original, tmp_path / "elsewhere" / original.name, with_outputs=False)
    for stage in ANALYSES:
        assert main([stage, f"run={again}", *CHEAP[stage]]) == 0
    for rel in ("activations/stats.parquet", "saliency/metrics.parquet", "synthesis/metrics.parquet",
                "geometry/equivariance.parquet", "geometry/erf.parquet"):
        assert (original / rel).read_bytes() == (again / rel).read_bytes(), rel
    pages = []
    for k, run in enumerate((original, again)):
        assert main(["report", f"runs=[{run}]", f"out_dir={tmp_path / f'reports{k}'}", "name=r"]) == 0
        pages.append((tmp_path / f"reports{k}" / "r" / "index.html").read_bytes())
    assert pages[0] == pages[1]


# --- report safety: markup from class names (image folder names) and config values is escaped ------------

@pytest.mark.slow
def test_markup_in_class_names_and_config_values_is_escaped(complete_runs, tmp_path):
    root = tmp_path / "<img src=x onerror=alert(1)>"
    _folder(root, {"<b onclick=alert(3)>bold": [_img(10 * i, "L", (16, 16)) for i in range(8)],
                   "a&b \"q\" 'x'": [_img(200 - 10 * i, "L", (16, 16)) for i in range(8)]})
    run = tmp_path / "evil"
    assert main(["train", *TINY_TRAIN, "data=imagefolder", f"data.root='{root}'", "data.channels=1",
                 f"run_dir={run}", f"hydra.run.dir={tmp_path / 'logs'}"]) == 0
    assert read_card(run)["data"]["classes"] == ["<b onclick=alert(3)>bold", "a&b \"q\" 'x'"]
    assert main(["report", f"runs=[{run},{complete_runs[1]}]", f"out_dir={tmp_path / 'reports'}", "name=r"]) == 0
    html = (tmp_path / "reports" / "r" / "index.html").read_text()
    assert "<img src=x" not in html and "<b onclick" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # the data.root config value is shown, escaped


# --- load: flat memory over 50,000 images; a parallel sweep -------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch.utils.data import Dataset
    import probe.pipeline.activations.stage as st
    from probe.pipeline.activations.config import ActivationsConfig, ActivationsStage
    from probe.pipeline.config import AnalysisData

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    class Repeated(Dataset):
        # the split repeated to n images, each copy shifted by a small seeded random offset
        def __init__(self, base, n):
            self.x, self.y = base.tensors
            self.n = n
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
            j = i % len(self.y)
            return torch.roll(self.x[j], (dy, dx), (1, 2)), self.y[j]

    n = int(sys.argv[2])
    real_open = st.open_run
    start = {}
    def open_run(cfg):
        ctx = real_open(cfg)
        ctx.dataset = Repeated(ctx.data.test, n)
        ctx.labels = ctx.data.test.tensors[1].repeat(n // len(ctx.data.test) + 1)[:n].numpy()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        start["rss"] = status_mb("VmRSS")
        return ctx
    st.open_run = open_run
    st.run(ActivationsStage(run=sys.argv[1], data=AnalysisData(batch_size=256), activations=ActivationsConfig(images=False)))
    print(json.dumps({"start_mb": start["rss"], "peak_mb": status_mb("VmHWM")}))
""")
RSS_TOLERANCE_MB = 16  # the stage's own peak (above its start) may grow by at most this from 5,000 to 50,000 images


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets and reads the peak RSS in /proc (Linux)")
def test_activations_over_50000_images_run_in_flat_memory(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run", with_outputs=False)
    growth = {}
    for n in (5_000, 50_000):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(run), str(n)], capture_output=True, text=True,
                             cwd=tmp_path, env={**os.environ, "MPLBACKEND": "Agg"}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        m = json.loads(out.stdout.strip().splitlines()[-1])
        growth[n] = m["peak_mb"] - m["start_mb"]  # what the stage itself needed at its peak
    assert growth[50_000] - growth[5_000] < RSS_TOLERANCE_MB, f"stage peak above its start (MB): {growth}"


@pytest.mark.slow
def test_a_parallel_joblib_sweep_of_8_gives_8_complete_distinct_run_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "probe", "train", "-m", "hydra/launcher=joblib",
                          "hydra.launcher.n_jobs=4", "model=tiny_cnn", "seed=0,1,2,3,4,5,6,7", "data.image_size=16",
                          "train.epochs=1", "progress=false", f"hydra.sweep.dir={sweep}"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "MPLBACKEND": "Agg"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("card.json"))
    assert len(runs) == 8
    cards = [read_card(r) for r in runs]
    assert sorted(c["seed"] for c in cards) == list(range(8))
    weights = {(r / "model.safetensors").read_bytes() for r in runs}
    assert len(weights) == 8  # distinct seeds, distinct models, no run overwrote another
    assert not list(sweep.rglob("last_state.pt")) and not list(sweep.rglob(".*.tmp"))
