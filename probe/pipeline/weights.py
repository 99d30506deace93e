"""``probe weights models=[alexnet,vgg16] weights=DEFAULT``: are the pretrained weights there?

Lists the file every model needs (torchvision weights: ``$TORCH_HOME/hub/checkpoints/<file>``, the
file torchvision itself would download) and stops with exit 1 naming EVERY missing file, its URL
and where to put it, before any work starts. Nothing is downloaded. ``out=<file>`` records the
files found (name, path, size) as JSON, so that a DVC stage can depend on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from probe.pipeline.config import check_choice
from probe.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)


@dataclass
class WeightsStage:
    models: list[str] = field(default_factory=list)  # model names (torchvision classifiers)
    weights: str = "DEFAULT"  # torchvision weights name for every model, or a local .safetensors/.pt file
    # a YAML file (e.g. a DVC params.yaml) whose `models` (list, or dict of name -> anything) and, when
    # present, `weights` are used instead of the two keys above
    params_file: Optional[str] = None
    out: Optional[str] = None  # JSON written when every file is there

    def __post_init__(self) -> None:
        from probe.models import list_models

        if self.params_file is not None:
            import yaml

            path = Path(self.params_file)
            if not path.is_file():
                raise ConfigError(f"params_file: {path} not found")
            data = yaml.safe_load(path.read_text()) or {}
            if "models" not in data:
                raise ConfigError(f"params_file: {path} has no 'models' key")
            self.models = list(data["models"])
            self.weights = str(data.get("weights", self.weights))
        if not self.models:
            raise ConfigError("models: empty; give models=[alexnet,vgg16] (torchvision classifiers)")
        for m in self.models:
            check_choice("models", m, list_models())


def needed_file(model: str, weights: str) -> tuple[Path, str | None]:
    """The file ``build(model, weights=weights)`` reads, and the URL it comes from (None for local files)."""
    from probe.models import is_weights_file, spec
    from probe.models.weights import hub_checkpoint_path, torchvision_weights

    if is_weights_file(weights):
        return Path(weights), None
    if spec(model).source != "torchvision":
        raise ConfigError(f"models: '{model}' is a probe model; torchvision weights names apply to torchvision models only")
    url = torchvision_weights(model, weights).url
    return hub_checkpoint_path(url), url


def run(cfg: WeightsStage) -> dict:
    import torch

    from probe.files import write_json

    found, missing = {}, []
    for m in cfg.models:
        path, url = needed_file(m, cfg.weights)
        if path.is_file():
            found[m] = {"file": path.name, "path": str(path), "bytes": path.stat().st_size, "url": url}
        else:
            missing.append(f"{m}: {path}" + (f" (from {url})" if url else ""))
    if missing:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsError(
            f"weights: {len(missing)} of {len(cfg.models)} weights files missing: {'; '.join(missing)}. "
            f"On a machine with internet download each URL (or run `python -c \"import torchvision; "
            f"torchvision.models.get_model('<model>', weights='DEFAULT')\"` there) and copy the files into {hub}/ "
            f"(set TORCH_HOME to use another cache: files go to $TORCH_HOME/hub/checkpoints/)")
    for m, f in found.items():
        log.info("weights: %s -> %s (%d bytes)", m, f["path"], f["bytes"])
    if cfg.out:
        # paths and sizes only (the cache location may differ between machines: record the file names)
        write_json(Path(cfg.out), {m: {"file": f["file"], "bytes": f["bytes"]} for m, f in found.items()})
    return found
