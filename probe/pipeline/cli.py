"""``probe <stage> [hydra overrides]``: every stage is a Hydra app (``-m`` sweeps work)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import hydra
from omegaconf import DictConfig

from probe.errors import closest
from probe.pipeline.config import to_object
from probe.errors import ProbeError

log = logging.getLogger("probe")


def summary(cfg) -> None:
    """Print the layer table of ``cfg.model``, as in the lecture, with receptive fields."""
    from probe.models import build, spec
    from probe.models.summary import format_table, layer_table

    s = spec(cfg.model.name)
    size = cfg.image_size or s.image_size
    model = build(cfg.model.name, weights=cfg.model.weights, **cfg.model.kwargs)
    print(f"{cfg.model.name}: input {s.channels}x{size}x{size}")
    print(format_table(layer_table(model, s.channels, size), model))


def register_schemas(stages: dict[str, type]) -> None:
    """Store each stage's dataclass as ``<stage>_schema`` for its primary config's defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for stage, schema in stages.items():
        cs.store(name=f"{stage}_schema", node=schema)


# stage name -> (function "module:name", config dataclass "module:name")
STAGES = {
    "train": ("probe.pipeline.train:train", "probe.pipeline.config:TrainStage"),
    "summary": ("probe.pipeline.cli:summary", "probe.pipeline.config:SummaryStage"),
    "activations": ("probe.pipeline.activations.stage:run", "probe.pipeline.activations.config:ActivationsStage"),
    "activations_merge": ("probe.pipeline.activations.stage:merge", "probe.pipeline.activations.config:ActivationsMergeStage"),
    "synthesize": ("probe.pipeline.synthesis.stage:run", "probe.pipeline.synthesis.config:SynthesizeStage"),
    "geometry": ("probe.pipeline.geometry.stage:run", "probe.pipeline.geometry.config:GeometryStage"),
    "saliency": ("probe.pipeline.saliency.stage:run", "probe.pipeline.saliency.config:SaliencyStage"),
    "report": ("probe.pipeline.report.stage:run", "probe.pipeline.report.config:ReportStage"),
    "weights": ("probe.pipeline.weights:run", "probe.pipeline.weights:WeightsStage"),
}


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf composition errors condensed to one line naming the key and what is allowed."""
    text = str(e).strip()
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"{group}: '{value}' is not allowed{closest(value, options)}; allowed: {', '.join(options[:15])}"
    cause = e.__cause__ or e.__context__
    unknown = _unknown_key(cause)
    if unknown:
        return unknown
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if cause is not None and str(cause).strip():
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    key = next((ln for ln in lines if ln.startswith("full_key:")), None)
    first = lines[0] if lines else type(e).__name__
    return f"{key.split(':', 1)[1].strip()}: {first}" if key and key.split(':', 1)[1].strip() else first


def _unknown_key(cause) -> str | None:
    """``key: unknown key (did you mean 'x'?); allowed: ...`` for an override of a key the schema lacks."""
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not getattr(cause, "key", None):
        return None
    parent = getattr(cause, "parent_node", None)
    if not isinstance(parent, DictConfig):
        return None
    keys = [str(k) for k in parent.keys() if k != "hydra"]
    key = cause.full_key or cause.key
    return f"{key}: unknown key{closest(cause.key, keys)}; allowed: {', '.join(keys)}"


def _register_model_options() -> None:
    """Every buildable model is an option of the ``model`` group: ``model=resnet50`` works."""
    from hydra.core.config_store import ConfigStore

    from probe.models import list_models

    cs = ConfigStore.instance()
    for name in list_models():
        cs.store(group="model", name=name, node={"name": name})


# stage -> (attribute path, key in messages) of the config values that name layers of the run's model
LAYER_KEYS = {
    "activations": (("layers", "layers"), ("feature_map_layers", "feature_map_layers")),
    "saliency": (("saliency.gradcam_layer", "saliency.gradcam_layer"),),
    "synthesize": (("synthesis.layers", "synthesis.layers"), ("synthesis.dream.layer", "synthesis.dream.layer")),
    "geometry": (("layers", "layers"),),
}
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

    from probe.pipeline.config import AnalysisStage

    with initialize_config_module(config_module="probe.pipeline.conf", version_base="1.3"):
        cfg = compose(config_name=stage, overrides=overrides)
    if "run_dir" in cfg and OmegaConf.is_interpolation(cfg, "run_dir"):
        cfg.run_dir = "."  # ${hydra:runtime.output_dir}: only known once Hydra runs the job
    obj = to_object(cfg)
    from probe.pipeline.rundir import read_card

    if isinstance(obj, AnalysisStage):
        card = read_card(obj.run)
        _check_layers(stage, obj, card)
    elif stage == "report":
        from probe.pipeline.report.collect import find_run_dirs

        for path in find_run_dirs(obj.runs, obj.sweep):
            read_card(path)


def _check_layers(stage: str, obj, card: dict) -> None:
    keys = LAYER_KEYS.get(stage, ())
    wanted = []
    for path, key in keys:
        value = obj
        for part in path.split("."):
            value = getattr(value, part, None)
        if value:
            wanted.append((key, [value] if isinstance(value, str) else list(value)))
    if not wanted:
        return
    from probe.capture import resolve_layers
    from probe.models import build

    m = card["model"]
    try:  # the architecture only (no weights): layer names do not depend on them
        model = build(m["name"], in_channels=m["in_channels"], num_classes=m["num_classes"], **m.get("kwargs", {}))
    except Exception:  # the stage itself reports a model it cannot build
        return
    for key, names in wanted:
        resolve_layers(model, names, key)


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: probe <stage> [hydra overrides]   stages: {', '.join(STAGES)}\n"
              "       probe <stage> --help   shows the stage's config")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"probe: error: stage '{stage}' is not allowed{closest(stage, STAGES)}; allowed: {', '.join(STAGES)}",
              file=sys.stderr)
        return 2
    func, schema = _load(STAGES[stage][0]), _load(STAGES[stage][1])
    register_schemas({stage: schema})
    _register_model_options()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us; we print them as one line

    multirun = any(a in ("-m", "--multirun") for a in rest)
    overrides = [a for a in rest if a not in ("-m", "--multirun")]
    failures: list[ProbeError] = []

    @hydra.main(config_path="conf", config_name=stage, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        try:
            func(to_object(cfg))
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
    except KeyboardInterrupt:  # Ctrl-C: staged outputs were removed on the way out; the shell's code for SIGINT
        print(f"probe {stage}: interrupted; the outputs of this command were not written", file=sys.stderr)
        return 130
    finally:
        sys.argv = old_argv
    return 0


def entry() -> None:
    sys.exit(main())
