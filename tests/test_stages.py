"""The stage registry (probe/pipeline/stages.py) against what the stages really do: each record's schema is the
type its packaged primary config composes to, its function imports, its layer keys are the schema's layer keys
and are checked against the run's model, its output folders are exactly what the stage writes into a run dir
(and what retraining removes), and its report sections are the ones that miss when that folder does. Every
stage's own keys live in its namespace; the old top-level spelling fails naming the new key."""

import dataclasses
import inspect
import json
import shutil
import typing
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from probe.pipeline.cli import main, register
from probe.pipeline.rundir import remove_analyses
from probe.pipeline.stages import STAGES

from conftest import CHEAP

RECORDS = list(STAGES.values())
WRITERS = [s for s in RECORDS if s.outputs]  # the stages that write into the run dir they are given
MERGE_ARGS = ["activations.shards=2"]


def cheap(record) -> list[str]:
    """Arguments that make ``record``'s stage quick (activations_merge: those of the shards, and their count)."""
    return [*MERGE_ARGS, *CHEAP["activations"]] if record.name == "activations_merge" else CHEAP[record.name]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dataclass_keys(schema, prefix: str = "") -> dict[str, typing.Any]:
    """Dotted key -> annotated type of every field of ``schema``, nested dataclasses walked."""
    out, hints = {}, typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        out[prefix + f.name] = hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(dataclass_keys(hints[f.name], f"{prefix}{f.name}."))
    return out


def names_a_list(hint) -> bool:
    """``list[str]`` or ``Optional[list[str]]`` (else a single name)."""
    return typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in typing.get_args(hint))


def folders(run: Path) -> set[str]:
    """The top-level names in ``run`` but Hydra's ``logs``."""
    return {p.name for p in run.iterdir()} - {"logs"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def fresh(tiny_run, tmp_path, monkeypatch):
    """A copy of the module's trained tiny run dir (no analyses), with the cwd in an empty folder."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("logs"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return run


# --- each record is consistent with the code it names -------------------------------------------------

@pytest.mark.parametrize("record", RECORDS, ids=[s.name for s in RECORDS])
def test_the_schema_is_what_the_packaged_primary_config_composes_to_and_what_the_function_takes(record):
    primary = OmegaConf.create(resources.files("probe.pipeline.conf").joinpath(f"{record.config}.yaml").read_text())
    assert primary.defaults[0] == f"{record.config}_schema"  # the name register() stores the schema under
    assert primary.hydra.job.name == record.name
    schema = record.load_schema()
    register(record)
    with initialize_config_module(config_module="probe.pipeline.conf", version_base="1.3"):
        cfg = compose(config_name=record.config)
    assert OmegaConf.get_type(cfg) is schema
    function = record.load_function()
    first = next(iter(inspect.signature(function).parameters))
    assert typing.get_type_hints(function).get(first, schema) is schema  # where the function states its type


@pytest.mark.parametrize("record", RECORDS, ids=[s.name for s in RECORDS])
def test_layer_keys_are_every_key_of_the_schema_that_names_layers(record):
    declared = dataclass_keys(record.load_schema())
    assert set(record.layer_keys) <= set(declared)
    assert set(record.layer_keys) == {k for k in declared if "layer" in k.rsplit(".", 1)[-1]}


def test_help_lists_every_stage_and_an_unknown_one_is_refused(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)
    assert main(["activation"]) == 2
    line = one_error_line(capsys)
    assert "did you mean 'activations'" in line and all(name in line for name in STAGES)


LAYER_KEY_CASES = [(s, k) for s in RECORDS for k in s.layer_keys]


@pytest.mark.parametrize("record,key", LAYER_KEY_CASES, ids=[f"{s.name}:{k}" for s, k in LAYER_KEY_CASES])
def test_a_layer_key_naming_no_layer_of_the_run_exits_2_before_anything_is_written(record, key, fresh, capsys):
    value = "[conv_9]" if names_a_list(dataclass_keys(record.load_schema())[key]) else "conv_9"
    before = files(fresh)
    assert main([record.name, f"run={fresh}", *cheap(record), f"{key}={value}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"probe {record.name}: error: {key}: layer 'conv_9' does not exist"), line
    assert files(fresh) == before and list(Path.cwd().iterdir()) == []


# --- outputs: what each stage writes, what retraining removes, what the report misses without it -------

def _report_missing(run: Path, out: Path) -> dict:
    assert main(["report", f"runs=[{run}]", f"out_dir={out}", "name=t"]) == 0
    return json.loads((out / "t" / "report.json").read_text())["missing"]


@pytest.mark.parametrize("record", WRITERS, ids=[s.name for s in WRITERS])
def test_a_stage_writes_its_output_folders_which_retraining_removes_and_the_report_reads(record, fresh, tmp_path):
    trained = folders(fresh)
    if record.name == "activations_merge":  # what it merges
        for i in range(2):
            assert main(["activations", f"run={fresh}", f"activations.shard={i}/2", *CHEAP["activations"]]) == 0
    prepared = folders(fresh)
    assert main([record.name, f"run={fresh}", *cheap(record)]) == 0
    assert folders(fresh) - prepared == {record.output}
    assert (fresh / record.output / "metrics.json").is_file()
    if record.name == "activations":  # its other folder: the states of `activations.shard=i/n`
        assert main(["activations", f"run={fresh}", "activations.shard=0/2", *CHEAP["activations"]]) == 0
        assert folders(fresh) - trained == set(record.outputs)

    # the report misses exactly the sections that the absent stages' folders feed, naming the command for each
    present = folders(fresh)
    missing = _report_missing(fresh, tmp_path / "reports")
    expected = {sid: other for other in RECORDS for sid in other.sections if other.output not in present}
    assert set(missing) == set(expected)
    for sid, other in expected.items():
        assert [m["command"] for m in missing[sid]] == [f"probe {other.name} run={fresh}"], sid

    # retraining's cleanup removes everything the stages wrote
    assert set(remove_analyses(fresh)) == present - trained
    assert folders(fresh) == trained


def test_a_run_without_analyses_misses_every_stage_section_with_its_command(fresh, tmp_path):
    missing = _report_missing(fresh, tmp_path / "reports")
    expected = {sid: s for s in RECORDS for sid in s.sections}
    assert set(missing) == set(expected) and expected
    for sid, s in expected.items():
        assert [m["command"] for m in missing[sid]] == [f"probe {s.name} run={fresh}"], sid


# --- every stage's keys in its own namespace ------------------------------------------------------------

def test_activations_keys_under_activations(fresh):
    assert main(["activations", f"run={fresh}", "activations.layers=[conv1,fc]", "activations.top_k=3",
                 "activations.images=false", *CHEAP["activations"]]) == 0
    stats = pd.read_parquet(fresh / "activations" / "stats.parquet")
    assert set(stats["layer"]) == {"conv1", "fc"}
    ex = pd.read_parquet(fresh / "activations" / "exemplars.parquet")
    assert ex.groupby(["layer", "channel"]).size().max() == 3  # top_k exemplars per channel
    assert not list((fresh / "activations").glob("*.png"))


def test_geometry_keys_under_geometry(fresh):
    assert main(["geometry", f"run={fresh}", "geometry.layers=[conv1,conv2]", "geometry.shift.shifts=[2]",
                 "geometry.shift.axes=[x]", "geometry.figures=false", *CHEAP["geometry"]]) == 0
    eq = pd.read_parquet(fresh / "geometry" / "equivariance.parquet")
    assert set(eq["layer"]) == {"conv1", "conv2"} and set(eq["shift"]) == {2} and set(eq["axis"]) == {"x"}
    assert not list((fresh / "geometry").glob("*.png"))


OLD = [  # stage, the old top-level override (extra args), the key it names now
    ("activations", ["layers=[conv1]"], "layers", "activations.layers"),
    ("activations", ["+layers=[conv1]"], "layers", "activations.layers"),
    ("activations", ["top_k=3"], "top_k", "activations.top_k"),
    ("activations", ["feature_map_layers=[conv1]"], "feature_map_layers", "activations.feature_map_layers"),
    ("activations", ["shard=0/4"], "shard", "activations.shard"),
    ("activations_merge", ["shards=2"], "shards", "activations.shards"),
    ("geometry", ["layers=[conv1]"], "layers", "geometry.layers"),
    ("geometry", ["shift.shifts=[1,2]"], "shift.shifts", "geometry.shift.shifts"),
    ("geometry", ["erf.mass=0.5"], "erf.mass", "geometry.erf.mass"),
    ("geometry", ["dynamics_steps=4"], "dynamics_steps", "geometry.dynamics_steps"),
]


@pytest.mark.parametrize("stage,overrides,key,new", OLD, ids=[f"{o[0]}:{o[1][0]}" for o in OLD])
def test_the_old_top_level_key_exits_2_naming_the_new_one(stage, overrides, key, new, fresh, capsys):
    before = files(fresh)
    assert main([stage, f"run={fresh}", *overrides]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"probe {stage}: error: {key}: unknown key (did you mean '{new}'?)"), line
    assert files(fresh) == before and list(Path.cwd().iterdir()) == []
