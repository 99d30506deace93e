"""timm models (``timm:<name>``), built without timm ever downloading or unpickling anything.

probe asks timm for the architecture only (``pretrained=False``) and loads the weights itself, strictly and
without pickles (:func:`probe.models.weights.read_state_dict`): from a local file, or, for ``weights="DEFAULT"``
or a pretrained tag (``a1_in1k``), from timm's own caches: the Hugging Face hub cache
(``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub/models--timm--<name>.<tag>/``) for ``timm/`` hub weights, the
torch hub cache for weights timm still fetches by URL. timm's own ``pretrained=True``,
``pretrained_cfg_overlay=dict(file=...)`` and ``checkpoint_path`` are refused as kwargs: they would reach the
network or read a pickle.
"""

from __future__ import annotations

import torch.nn as nn

from probe.errors import WeightsError, closest
from probe.models.sources import ModelError

TIMM_LOADERS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def pretrained_cfg(name: str, tag: str | None = None):
    """timm's ``PretrainedCfg`` of ``name`` (its default tag, or ``tag``)."""
    import timm
    import timm.models

    arch = name.split(".")[0]
    if tag is None:
        return timm.models.get_pretrained_cfg(name)
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if tag not in tags:
        raise ModelError("weights", f"'{tag}': timm has no pretrained weights {arch}.{tag}{closest(tag, tags)}; "
                                    f"allowed: DEFAULT{''.join(', ' + t for t in tags)}, or a weights file")
    return timm.models.get_pretrained_cfg(f"{arch}.{tag}")


def create(name: str, *, in_channels: int | None, num_classes: int | None, kwargs: dict) -> nn.Module:
    """The architecture of timm model ``name``, randomly initialised (kwargs go to ``timm.create_model``)."""
    import timm

    refused = [k for k in TIMM_LOADERS if k in kwargs]
    if refused:
        raise ModelError("kwargs", f"'{refused[0]}' is not passed to timm (it would download or unpickle weights); "
                                   f"give a file or DEFAULT as weights instead")
    args = dict(kwargs)
    if in_channels is not None:
        args.setdefault("in_chans", in_channels)
    if num_classes is not None:
        args.setdefault("num_classes", num_classes)
    try:
        return timm.create_model(name, pretrained=False, **args)
    except TypeError as e:
        raise ModelError("kwargs", f"timm:{name} does not accept them ({e})") from None


def cached_weights(name: str, weights: str) -> str:
    """The path of timm's cached weights ``weights`` ("DEFAULT" or a tag) of ``name``; never downloads."""
    from huggingface_hub import constants, try_to_load_from_cache

    from probe.models.weights import hub_checkpoint_path

    cfg = pretrained_cfg(name, None if weights == "DEFAULT" else weights)
    looked: list[str] = []
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str):
                return path
        looked.append(f"{constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')}/snapshots/*/{files[0]}")
    if cfg.url:
        path = hub_checkpoint_path(cfg.url)
        if path.is_file():
            return str(path)
        looked.append(str(path))
    fetch = f"python -c \"import timm; timm.create_model('{name.split('.')[0]}.{cfg.tag}', pretrained=True)\""
    raise WeightsError(f"timm:{name} weights {weights}: not in timm's caches (looked for {' and '.join(looked) or 'a source'});"
                       f" on a machine with internet run {fetch} and copy the cache here, or give a weights file")
