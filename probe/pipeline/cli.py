"""``probe <stage> [hydra overrides]``: every stage is a Hydra app (``-m`` sweeps work)."""

from __future__ import annotations

import logging
import os
import re
import sys

import hydra
from omegaconf import DictConfig

from probe.errors import ProbeError, closest
from probe.pipeline.config import AnalysisStage, to_object
from probe.pipeline.stages import STAGES, Stage

log = logging.getLogger("probe")


def summary(cfg) -> None:
    """Print the layer table of ``cfg.model`` (probe's, torchvision's, timm's or your own), as in the lecture,
    with receptive fields."""
    from probe.models import spec
    from probe.models.summary import format_table, layer_table
    from probe.pipeline.model import build_model

    m = cfg.model
    s = spec(m.source)
    channels = m.input.channels or s.channels
    size = cfg.image_size or m.input.size or s.image_size
    model = build_model(m, channels, size)
    print(f"{m.name}: input {channels}x{size}x{size}")
    print(format_table(layer_table(model, channels, size), model))


def register_schemas(configs: dict[str, type]) -> None:
    """Store each schema as ``<config>_schema`` for the defaults list of primary config ``<config>.yaml``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for config, schema in configs.items():
        cs.store(name=f"{config}_schema", node=schema)


def register(record: Stage) -> None:
    """What Hydra needs in its ConfigStore to compose ``record``'s primary config: its schema, the model options."""
    register_schemas({record.config: record.load_schema()})
    _register_model_options()


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf composition errors condensed to one line naming the key and what is allowed."""
    text = str(e).strip()
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"{group}: '{value}' is not allowed{closest(value, options)}; allowed: {', '.join(options[:15])}"
    cause = e.__cause__ or e.__context__
    override = re.match(r"Could not override '([^']+)'", text)
    unknown = _unknown_key(cause, override.group(1) if override else None)
    if unknown:
        return unknown
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if cause is not None and str(cause).strip():
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    key = next((ln for ln in lines if ln.startswith("full_key:")), None)
    first = lines[0] if lines else type(e).__name__
    return f"{key.split(':', 1)[1].strip()}: {first}" if key and key.split(':', 1)[1].strip() else first


def _unknown_key(cause, override: str | None) -> str | None:
    """``key: unknown key (did you mean 'x'?); allowed: ...`` for an override of a key the schema lacks
    (``override``: the key as the command gave it, when Hydra's message names it)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from probe.pipeline.config import unknown_key_message

    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not getattr(cause, "key", None):
        return None
    parent = getattr(cause, "parent_node", None)
    if not isinstance(parent, DictConfig):
        return None
    keys = [str(k) for k in parent.keys() if k != "hydra"]
    key = override or cause.full_key or cause.key
    if OmegaConf.get_type(parent) is dict:  # a free-form dict such as model.kwargs takes any key, added with +
        return f"{key}: not in the config; add a new key with +{key}=<value>"
    return unknown_key_message(key, keys, OmegaConf.get_type(parent._get_root()))


def _register_model_options() -> None:
    """Every model is an option of the ``model`` group: ``model=resnet50``, ``model=timm:resnet18``,
    ``model=mypkg.nets:make_net``, a study's ``conf/model/<name>.yaml`` (:func:`probe.pipeline.model.register_options`)."""
    from probe.pipeline.model import register_options

    register_options()


MAX_PRECHECKS = 64  # sweeps: at most this many compositions are checked up front


def _override_sets(overrides: list[str], multirun: bool) -> list[list[str]] | None:
    """The override lists to check before anything runs: the command's own, or for a sweep enough
    combinations that every swept value appears once (None: a sweep we cannot expand here)."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        choices = []
        for o in OverridesParser.create().parse_overrides(overrides):
            if o.is_sweep_override():
                if not o.is_discrete_sweep():
                    return None
                choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
            else:
                choices.append([o.input_line])
    except Exception:  # glob() choices and other sweeper syntax: checked by each job instead
        return None
    n = min(max((len(c) for c in choices), default=1), MAX_PRECHECKS)
    return [[c[i % len(c)] for c in choices] for i in range(n)]


def _precheck(stage: str, overrides: list[str]) -> None:
    """Compose and validate the config (and the run dirs and layer names it refers to) before Hydra
    creates any output folder, so that a bad command writes nothing. Raises ConfigError/RunDirError."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf


    with initialize_config_module(config_module="probe.pipeline.conf", version_base="1.3"):
        cfg = compose(config_name=STAGES[stage].config, overrides=overrides)
    if "run_dir" in cfg and OmegaConf.is_interpolation(cfg, "run_dir"):
        cfg.run_dir = "."  # ${hydra:runtime.output_dir}: only known once Hydra runs the job
    obj = to_object(cfg)
    from probe.pipeline.rundir import read_card

    if isinstance(obj, AnalysisStage):
        card = read_card(obj.run)
        _check_layers(stage, obj, card)
    elif stage in ("report", "compare"):
        from probe.pipeline.rundir import find_run_dirs

        for path in find_run_dirs(obj.runs, obj.sweep):
            read_card(path)


def _check_layers(stage: str, obj, card: dict) -> None:
    """The run's model is one this command may import (:func:`probe.pipeline.model.trusted_source`), and it
    has the layers the config names (built without weights: layer names do not depend on them)."""
    from probe.hooks import resolve_layers
    from probe.pipeline.model import rebuild, trusted_source

    where = f"{obj.run}/card.json"
    trusted_source(card, where, obj.trust)
    wanted = []
    for key in STAGES[stage].layer_keys:
        value = obj
        for part in key.split("."):
            value = getattr(value, part, None)
        if value:
            wanted.append((key, [value] if isinstance(value, str) else list(value)))
    if not wanted:
        return
    model = rebuild(card, where, trust=obj.trust)
    for key, names in wanted:
        resolve_layers(model, names, key)


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: probe <stage> [hydra overrides]   stages: {', '.join(STAGES)}\n"
              "       probe <stage> --help   shows the stage's config\n"
              "       probe init DIR          a study of your own: conf/, params.yaml, dvc.yaml calling probe\n"
              "       probe --version         the installed probe's version\n"
              "       probe --expect-version V <stage> ...   runs the stage only where probe V is installed")
        return 0
    from probe.pipeline import init

    if argv[0] == "--version":
        print(f"probe {init.installed_version()}")
        return 0
    if argv[0] == "--expect-version":
        mismatch = init.version_mismatch(argv[1] if len(argv) > 1 else "")
        if mismatch:
            print(f"probe: error: {mismatch}", file=sys.stderr)
            return 2
        argv = argv[2:]
    if argv[:1] == ["init"]:
        return init.main(argv[1:])
    stage, rest = (argv[0], argv[1:]) if argv else ("", [])
    if stage not in STAGES:
        commands = [*STAGES, "init"]
        print(f"probe: error: stage '{stage}' is not allowed{closest(stage, commands)}; allowed: {', '.join(commands)}",
              file=sys.stderr)
        return 2
    record = STAGES[stage]
    func = record.load_function()
    register(record)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we print them as one line

    multirun = any(a in ("-m", "--multirun") for a in rest)
    overrides = [a for a in rest if a not in ("-m", "--multirun")]
    init.use_study_folder()  # the current folder's conf/ after probe's own configs, its modules importable
    failures: list[ProbeError] = []

    @hydra.main(config_path="conf", config_name=record.config, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        try:
            from probe.pipeline.rundir import weights_lock

            obj = to_object(cfg)
            if isinstance(obj, AnalysisStage):  # it reads the run's weights: no retraining meanwhile
                with weights_lock(obj.run, write=False, what=f"probe {stage}"):
                    func(obj)
            else:
                func(obj)
        except ProbeError as e:  # reported below as one line, without Hydra's traceback
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # the job's failure travels back to the sweep (joblib/submitit run jobs in other processes)
            failures.append(e)

    old_argv = sys.argv
    try:
        if not any(a.startswith("-") for a in overrides):  # --help, --cfg, --info ...: Hydra answers those
            for chosen in _override_sets(overrides, multirun) or []:
                _precheck(stage, chosen)
        sys.argv = [f"probe-{stage}"] + rest
        app()
        if failures:
            raise failures[0]
    except ProbeError as e:
        print(f"probe {stage}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (HydraException, OmegaConfBaseException) as e:
        print(f"probe {stage}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `probe summary ... | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C: staged outputs were removed on the way out; the shell's code for SIGINT
        print(f"probe {stage}: interrupted; the outputs of this command were not written", file=sys.stderr)
        return 130
    finally:
        sys.argv = old_argv
    return 0


def entry() -> None:
    sys.exit(main())
