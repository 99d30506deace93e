"""``probe <stage> [hydra overrides]``: every stage is a Hydra app (``-m`` sweeps work)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import hydra
from omegaconf import DictConfig

from probe.config import closest, register_schemas, to_object
from probe.errors import ConfigError, ProbeError

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


# stage name -> (function "module:name", config dataclass "module:name")
STAGES = {
    "train": ("probe.train:train", "probe.config:TrainStage"),
    "summary": ("probe.cli:summary", "probe.config:SummaryStage"),
    "activations": ("probe.activations.stage:run", "probe.activations.config:ActivationsStage"),
    "activations_merge": ("probe.activations.stage:merge", "probe.activations.config:ActivationsMergeStage"),
    "synthesize": ("probe.synthesis.stage:run", "probe.synthesis.config:SynthesizeStage"),
    "geometry": ("probe.geometry.stage:run", "probe.geometry.config:GeometryStage"),
    "saliency": ("probe.saliency.stage:run", "probe.saliency.config:SaliencyStage"),
    "report": ("probe.report.stage:run", "probe.report.config:ReportStage"),
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
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if cause is not None and str(cause).strip():
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    key = next((ln for ln in lines if ln.startswith("full_key:")), None)
    first = lines[0] if lines else type(e).__name__
    return f"{key.split(':', 1)[1].strip()}: {first}" if key and key.split(':', 1)[1].strip() else first


def _register_model_options() -> None:
    """Every buildable model is an option of the ``model`` group: ``model=resnet50`` works."""
    from hydra.core.config_store import ConfigStore

    from probe.models import list_models

    cs = ConfigStore.instance()
    for name in list_models():
        cs.store(group="model", name=name, node={"name": name})


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

    failures: list[ProbeError] = []

    @hydra.main(config_path="conf", config_name=stage, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        try:
            func(to_object(cfg))
        except ProbeError as e:  # reported below as one line, without Hydra's traceback
            failures.append(e)

    old_argv = sys.argv
    sys.argv = [f"probe-{stage}"] + rest
    try:
        app()
        if failures:
            raise failures[0]
    except ProbeError as e:
        print(f"probe {stage}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (HydraException, OmegaConfBaseException) as e:
        print(f"probe {stage}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = old_argv
    return 0


def entry() -> None:
    sys.exit(main())
