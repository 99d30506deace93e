"""The stage registry: every ``probe <stage>`` declared once, read by the CLI, retraining cleanup, the report
and the tests.

A record names its function and config schema as ``"module:attribute"`` strings, imported only when the stage
runs, so that ``probe --help`` does not import every stage's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

SHARDS_DIR = "activations_shards"  # partial statistics of `probe activations activations.shard=i/n`


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI word: ``probe <name>``
    function: str  # "module:function" taking the schema's object
    schema: str  # "module:dataclass": the config schema, stored in Hydra's ConfigStore as ``<config>_schema``
    config: str  # the primary config, ``probe/pipeline/conf/<config>.yaml``
    # the folders it writes inside the run dir it analyses; the first is its result (with its metrics.json)
    outputs: tuple[str, ...] = ()
    layer_keys: tuple[str, ...] = ()  # dotted config keys whose values name layers of the run's model
    sections: tuple[str, ...] = ()  # ids of the report sections drawn from its result folder

    @property
    def output(self) -> str | None:
        """The result folder in the run dir (None: the stage writes no folder into a run dir)."""
        return self.outputs[0] if self.outputs else None

    def load_function(self):
        return _load(self.function)

    def load_schema(self) -> type:
        return _load(self.schema)


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


_RECORDS = (
    Stage("train", "probe.pipeline.train:train", "probe.pipeline.config:TrainStage", "train"),
    Stage("summary", "probe.pipeline.cli:summary", "probe.pipeline.config:SummaryStage", "summary"),
    Stage("activations", "probe.pipeline.activations.stage:run", "probe.pipeline.activations.config:ActivationsStage",
          "activations", outputs=("activations", SHARDS_DIR),
          layer_keys=("activations.layers", "activations.feature_map_layers"),
          sections=("filters", "feature-maps", "distributions")),
    Stage("activations_merge", "probe.pipeline.activations.stage:merge",
          "probe.pipeline.activations.config:ActivationsMergeStage", "activations_merge", outputs=("activations",),
          layer_keys=("activations.layers", "activations.feature_map_layers")),
    Stage("synthesize", "probe.pipeline.synthesis.stage:run", "probe.pipeline.synthesis.config:SynthesizeStage",
          "synthesize", outputs=("synthesis",), layer_keys=("synthesis.layers", "synthesis.dream.layer", "synthesis.diversity.layer"),
          sections=("synthesis",)),
    Stage("geometry", "probe.pipeline.geometry.stage:run", "probe.pipeline.geometry.config:GeometryStage",
          "geometry", outputs=("geometry",), layer_keys=("geometry.layers",), sections=("geometry",)),
    Stage("saliency", "probe.pipeline.saliency.stage:run", "probe.pipeline.saliency.config:SaliencyStage",
          "saliency", outputs=("saliency",), layer_keys=("saliency.gradcam_layer",), sections=("saliency",)),
    Stage("concepts", "probe.pipeline.concepts.stage:run", "probe.pipeline.concepts.config:ConceptsStage",
          "concepts", outputs=("concepts",), layer_keys=("concepts.layer",), sections=("concepts",)),
    Stage("compare", "probe.pipeline.compare.stage:run", "probe.pipeline.compare.config:CompareStage", "compare"),
    Stage("report", "probe.pipeline.report.stage:run", "probe.pipeline.report.config:ReportStage", "report"),
    Stage("weights", "probe.pipeline.weights:run", "probe.pipeline.weights:WeightsStage", "weights"),
)
STAGES: dict[str, Stage] = {s.name: s for s in _RECORDS}


def run_dir_folders() -> tuple[str, ...]:
    """Every folder that some stage writes inside a run dir (all computed from its weights), in registry order."""
    return tuple(dict.fromkeys(f for s in _RECORDS for f in s.outputs))


def result_folders() -> tuple[str, ...]:
    """The stages' result folders (each with its own metrics.json), in registry order."""
    return tuple(dict.fromkeys(s.output for s in _RECORDS if s.output))


def writer(folder: str) -> Stage:
    """The stage whose result ``folder`` is (the first one in registry order: ``activations``, not its merge)."""
    for s in _RECORDS:
        if s.output == folder:
            return s
    raise KeyError(f"no stage writes {folder!r}; result folders: {', '.join(result_folders())}")
