"""``probe compare runs=[A, B, ...]`` (or ``sweep=<folder>``): how the runs' representations differ, on the same
images -> ``<out_dir>/<name>/``.

Files:

- ``cka.parquet``: linear CKA (Kornblith et al. 2019), minibatch estimate with unbiased HSIC (Nguyen et al.
  2021; :mod:`probe.similarity.cka`) of every layer of every run against every layer of every run, the run
  with itself included: ``run_a, layer_a, run_b, layer_b, cka, se, batches, images``.
- ``units.parquet``: for every pair of runs of one architecture and every conv and linear layer, each unit's
  best partner in the other run by activation correlation over all images and positions (Li et al. 2016,
  :mod:`probe.similarity.matching`): ``run_a, run_b, layer, matching (semi | one_to_one), unit_a, unit_b, corr``;
  ``one_to_one`` is the permutation that aligns run_b's units to run_a's.
- ``dynamics.parquet``: for runs trained with ``train.snapshot_epochs``, CKA of each layer at each snapshot with
  the same layer of the final weights (Raghu et al. 2017's bottom-up convergence): ``run, epoch, layer, cka, se``.
- ``transfer.parquet``: every run's class images (from its synthesize stage) as every other run of the same input
  shape classifies them (:func:`class_image_transfer`): ``maker, judge, image, class, probability, predicted,
  recognised``.
- ``concepts.parquet``: for every pair of runs whose concepts stage ran on the same images, their concepts matched
  one to one by the correlation of their per-image coefficients (:func:`concept_matches`): ``run_a, layer_a,
  run_b, layer_b, concept_a, concept_b, corr``.
- ``cka.png``: the heatmaps; ``metrics.json``: images used, and for every pair of runs the CKA of their first
  and last conv layers, the share of units matched above 0.5 and 0.8, and the share of concepts matched above
  ``compare.concept_threshold`` with Wilson's interval (with the weights each run had).

Runs must have been trained on the same dataset with the same split (so that the split is the same images);
each run sees them at its own size, channels and normalisation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from probe.errors import ConfigError
from probe.files import write_json
from probe.hooks import conv_layers
from probe.models.weights import load_into, read_state_dict
from probe.pipeline.analysis import data_config, run_data
from probe.pipeline.compare.config import CompareStage
from probe.pipeline.compare.figures import save_heatmaps
from probe.pipeline.rundir import Run, find_run_dirs, load_run, run_labels, staged_dir, weights_digest, weights_lock
from probe.runtime import pick_device, seed_everything
from probe.uncertainty import proportion_interval
from probe.similarity import compare

log = logging.getLogger(__name__)

# what makes a split the same images in two runs (size, channels and normalisation may differ)
SAME_IMAGES = ("name", "root", "split_seed", "val_fraction", "test_fraction")


def run(cfg: CompareStage) -> Path:
    seed_everything(0, True)  # nothing here is random; deterministic kernels all the same
    torch.set_num_threads(cfg.threads)  # from the config, never the launcher (probe/pipeline/config.py)
    device = pick_device(cfg.device)
    paths = find_run_dirs(cfg.runs, cfg.sweep)
    with contextlib.ExitStack() as held:  # no retraining of any of them meanwhile
        for p in paths:
            held.enter_context(weights_lock(p, write=False, what="probe compare"))
        return _compare(cfg, paths, device)


def _compare(cfg: CompareStage, paths: list[Path], device: torch.device) -> Path:
    runs = [load_run(p, trust=cfg.trust) for p in paths]
    labels = run_labels(paths)
    check_same_images(runs, labels)
    splits = [_split(r, cfg) for r in runs]
    batch = minibatch_size(len(splits[0]), cfg.data.batch_size)
    loaders = [DataLoader(ds, batch_size=batch, shuffle=False) for ds in splits]
    names = [f"r{i}" for i in range(len(runs))]  # compare's model names (labels may hold '/')
    models = dict(zip(names, (r.model for r in runs)))
    pairs = same_architecture(runs)
    match = [(f"{names[i]}/{layer}", f"{names[j]}/{layer}") for i, j in pairs for layer in unit_layers(runs[i].model)]
    sim = compare(models, _zip(names, loaders), device=device, match=match if cfg.compare.match else (),
                  batch_size=batch)
    label_of = dict(zip(names, labels))
    cka = _split_keys(sim.result(), label_of)
    units = pd.concat([_unit_rows(u, label_of) for u in sim.units.values()] or [_unit_rows(None, label_of)],
                      ignore_index=True)
    dynamics = pd.concat([snapshot_cka(r, label, loader, batch, device)
                          for r, label, loader in zip(runs, labels, loaders) if cfg.compare.snapshots] or [_no_dynamics()],
                         ignore_index=True)
    transfer = class_image_transfer(runs, labels, device)
    concepts = concept_matches(runs, labels)
    final = Path(cfg.out_dir) / cfg.name
    with staged_dir(final) as tmp:
        cka.to_parquet(tmp / "cka.parquet", index=False)
        transfer.to_parquet(tmp / "transfer.parquet", index=False)
        concepts.to_parquet(tmp / "concepts.parquet", index=False)
        units.to_parquet(tmp / "units.parquet", index=False)
        dynamics.to_parquet(tmp / "dynamics.parquet", index=False)
        save_heatmaps(cka, labels, tmp / "cka.png")
        write_json(tmp / "metrics.json", metrics(cka, sim, runs, labels)
                   | {"concepts_matched": concept_shares(concepts, cfg.compare.concept_threshold)})
    log.info("compare: %d runs, %d layer pairs, %d images -> %s", len(runs), len(cka), sim.images, final)
    return final


TRANSFER_COLUMNS = ["maker", "judge", "image", "class", "probability", "predicted", "recognised"]


def class_image_transfer(runs: list[Run], labels: list[str], device: torch.device) -> pd.DataFrame:
    """The transfer matrix of class images: every run's class images (``synthesis/images.npz``, where its synthesize
    stage ran on its current weights) classified by every other run that takes images of the same shape
    (:func:`probe.synthesis.judge.transfer`), one row per (maker, judge, image): the judge's probability of the
    class the image was made for, its prediction, and whether it recognises the image. An image that only its
    own model calls a 3 is an adversarial pattern, not what the network thinks a 3 looks like."""
    from probe.pipeline.rundir import stale
    from probe.synthesis.judge import transfer

    judges = {}
    for r, label in zip(runs, labels):
        d = run_data(r.card)
        judges[label] = (r.model.to(device).eval(), d.mean, d.std, (d.channels, d.image_size))
    rows = []
    for r, label in zip(runs, labels):
        images, table = r.path / "synthesis" / "images.npz", r.path / "synthesis" / "metrics.parquet"
        if not (images.is_file() and table.is_file()):
            continue
        reason = stale(r.path, "synthesis")
        if reason:
            log.warning("compare: %s; its class images are not judged", reason)
            continue
        df = pd.read_parquet(table, columns=["kind", "class", "image"])
        made = df[df["kind"] == "class"].sort_values("image")
        with np.load(images) as z:
            pixels = torch.tensor(z["class"]) if "class" in z.files else None
        if pixels is None or not len(made):
            continue
        pixels = pixels[torch.from_numpy(made["image"].to_numpy(np.int64, copy=True))]
        shape = (pixels.shape[1], pixels.shape[-1])
        for other, (model, mean, std, takes) in judges.items():
            if other == label or takes != shape:
                continue
            t = transfer({other: (model, mean, std)}, pixels, [int(c) for c in made["class"]])
            t["image"] = made["image"].to_numpy()
            rows.append(t.assign(maker=label))
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(TRANSFER_COLUMNS, ["string", "string", "int64", "int64",
                                                                                    "float64", "int64", "bool"])})
    out = pd.concat(rows, ignore_index=True)[TRANSFER_COLUMNS]
    return out.astype({"maker": "string", "judge": "string"})


CONCEPT_COLUMNS = ["run_a", "layer_a", "run_b", "layer_b", "concept_a", "concept_b", "corr"]


def concept_matches(runs: list[Run], labels: list[str]) -> pd.DataFrame:
    """The concepts of every pair of runs matched one to one (:func:`probe.concepts.match_by_coefficients`): the
    Pearson correlation, over the images both concepts stages analysed, of each concept's spatial mean coefficient
    per image (``concepts/concepts.npz``'s ``image_mean``). The cosine of two networks' concept directions would
    mean nothing: their channels are different axes. Runs whose concepts stage is missing or stale, or ran on other
    images (``data.split``, ``data.limit``), are left out of the pairs they would make."""
    from probe.concepts import match_by_coefficients
    from probe.pipeline.rundir import stale

    banks = {}
    for r, label in zip(runs, labels):
        npz, m = r.path / "concepts" / "concepts.npz", r.path / "concepts" / "metrics.json"
        if not (npz.is_file() and m.is_file()):
            continue
        reason = stale(r.path, "concepts")
        if reason:
            log.warning("compare: %s; its concepts are not matched", reason)
            continue
        meta = json.loads(m.read_text())
        with np.load(npz) as z:
            banks[label] = ((meta.get("split"), meta.get("limit")), meta["layer"], z["image_mean"], z["labels"])
    rows = []
    for a, b in combinations(banks, 2):
        (images_a, layer_a, U_a, y_a), (images_b, layer_b, U_b, y_b) = banks[a], banks[b]
        if images_a != images_b or not np.array_equal(y_a, y_b):
            log.warning("compare: the concepts of %s and %s were found on different images; not matched", a, b)
            continue
        m = match_by_coefficients(U_a, U_b)
        rows.append(pd.DataFrame({"run_a": a, "layer_a": layer_a, "run_b": b, "layer_b": layer_b,
                                  "concept_a": m.pairs[:, 0], "concept_b": m.pairs[:, 1], "corr": m.scores}))
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(CONCEPT_COLUMNS, ["string"] * 4 + ["int64"] * 2 + ["float64"])})
    out = pd.concat(rows, ignore_index=True)[CONCEPT_COLUMNS]
    return out.astype({c: "string" for c in CONCEPT_COLUMNS[:4]} | {"concept_a": "int64", "concept_b": "int64"})


def concept_shares(matches: pd.DataFrame, threshold: float) -> dict:
    """Per pair ``"a~b"``: the share of the smaller bank's concepts whose partner correlates above ``threshold``,
    ``k`` of ``n`` with Wilson's interval."""
    out = {"threshold": threshold}
    for (a, b), g in matches.groupby(["run_a", "run_b"], sort=False):
        k = int((g["corr"] > threshold).sum())
        out[f"{a}~{b}"] = proportion_interval(k, len(g)).to_dict() | {"k": k}
    return out


def check_same_images(runs: list[Run], labels: list[str]) -> None:
    """Every run was trained on the same dataset and split, or a :class:`ConfigError` names the first that differs."""
    first = data_config(runs[0].card)
    for r, label in zip(runs[1:], labels[1:]):
        other = data_config(r.card)
        for key in SAME_IMAGES:
            if getattr(other, key) != getattr(first, key):
                raise ConfigError(f"runs: {label} was trained with data.{key}={getattr(other, key)!r} and {labels[0]} with "
                                  f"{getattr(first, key)!r}; compare needs runs whose split holds the same images")


def _split(r: Run, cfg: CompareStage):
    ds = run_data(r.card).split(cfg.data.split)
    if cfg.data.limit is not None and cfg.data.limit < len(ds):
        ds = Subset(ds, list(range(cfg.data.limit)))
    return ds


def minibatch_size(images: int, wanted: int) -> int:
    """``data.batch_size``, or half the images where that is smaller: at least two minibatches, so that every CKA
    has a standard error; a split of fewer than 8 images (two minibatches of 4, the unbiased HSIC's minimum) is
    refused."""
    size = min(wanted, images // 2)
    if size < 4:
        raise ConfigError(f"data.split: {images} images; compare needs at least 8 (two minibatches of 4)")
    return size


def _zip(names: list[str], loaders: list[DataLoader]):
    """The same images for every model: one batch of each run's own loader per step."""
    for batches in zip(*loaders, strict=True):
        yield {n: x for n, (x, _) in zip(names, batches)}


def same_architecture(runs: list[Run]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, i < j, of runs with the same model (name, keyword arguments and layer table)."""
    def arch(r: Run):
        m = r.card["model"]
        return (m.get("name"), repr(m.get("kwargs")), repr([(x["name"], x["output_shape"]) for x in r.card["layers"]]))
    return [(i, j) for i, j in combinations(range(len(runs)), 2) if arch(runs[i]) == arch(runs[j])]


def unit_layers(model: nn.Module) -> list[str]:
    """Where units are matched: every conv and linear layer."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _split_keys(df: pd.DataFrame, label_of: dict[str, str]) -> pd.DataFrame:
    a = df["key_a"].str.split("/", n=1, expand=True)
    b = df["key_b"].str.split("/", n=1, expand=True)
    out = pd.DataFrame({"run_a": a[0].map(label_of), "layer_a": a[1], "run_b": b[0].map(label_of), "layer_b": b[1]})
    return pd.concat([out, df.drop(columns=["key_a", "key_b"])], axis=1)


UNIT_COLUMNS = ["run_a", "run_b", "layer", "matching", "unit_a", "unit_b", "corr"]


def _unit_rows(u, label_of: dict[str, str]) -> pd.DataFrame:
    if u is None:
        return pd.DataFrame(columns=UNIT_COLUMNS)
    (ra, layer), (rb, _) = (k.split("/", 1) for k in (u.name_a, u.name_b))
    frames = []
    for kind, df in (("semi", u.best_match()), ("one_to_one", u.one_to_one())):
        frames.append(pd.DataFrame({"run_a": label_of[ra], "run_b": label_of[rb], "layer": layer, "matching": kind,
                                    "unit_a": df["unit_a"], "unit_b": df["unit_b"], "corr": df["corr"]}))
    return pd.concat(frames, ignore_index=True)[UNIT_COLUMNS]


DYNAMICS_COLUMNS = ["run", "epoch", "layer", "cka", "se"]


def _no_dynamics() -> pd.DataFrame:
    return pd.DataFrame(columns=DYNAMICS_COLUMNS)


def snapshot_cka(r: Run, label: str, loader: DataLoader, batch_size: int, device: torch.device) -> pd.DataFrame:
    """CKA of each layer at each snapshot of ``r`` with the same layer of its final weights."""
    from probe.geometry.dynamics import snapshot_paths

    snaps = snapshot_paths(r.path)
    if not snaps:
        return _no_dynamics()
    models = {"final": r.model}
    for epoch, path in snaps:
        m = copy.deepcopy(r.model)
        load_into(m, read_state_dict(path), str(path))
        models[f"e{epoch}"] = m
    sim = compare(models, ({n: x for n in models} for x, _ in loader), device=device, batch_size=batch_size)
    df = _split_keys(sim.result(), {n: n for n in models})
    df = df[(df.layer_a == df.layer_b) & (df.run_a != df.run_b) & ((df.run_a == "final") | (df.run_b == "final"))]
    snap = df.run_b.where(df.run_a == "final", df.run_a)
    out = pd.DataFrame({"run": label, "epoch": snap.str[1:].astype(int), "layer": df.layer_a, "cka": df.cka,
                        "se": df.se})[DYNAMICS_COLUMNS]
    return out.sort_values("epoch", kind="stable", ignore_index=True)  # layers stay in model order


def _cka_of(cka: pd.DataFrame, ra: str, la: str, rb: str, lb: str) -> pd.Series | None:
    hit = cka[(cka.run_a == ra) & (cka.layer_a == la) & (cka.run_b == rb) & (cka.layer_b == lb)]
    if hit.empty:
        hit = cka[(cka.run_a == rb) & (cka.layer_a == lb) & (cka.run_b == ra) & (cka.layer_b == la)]
    return None if hit.empty else hit.iloc[0]


def metrics(cka: pd.DataFrame, sim, runs: list[Run], labels: list[str]) -> dict:
    """Small and flat, for DVC: per pair of runs ``"a~b"`` the CKA (and its standard error) of their first and of
    their last conv layers, and for runs of one architecture the share of units whose one-to-one partner
    correlates above 0.5 and above 0.8 (all matched layers together)."""
    out: dict = {"images": sim.images, "images_unused": sim.images_dropped, "batch_size": sim.batch_size,
                 "batches": sim.cka.batches,
                 "weights_sha256": {label: weights_digest(r.path) for r, label in zip(runs, labels)}}
    convs = {label: conv_layers(r.model) for r, label in zip(runs, labels)}
    for which, pos in (("first_conv", 0), ("last_conv", -1)):
        out[f"cka_{which}"], out[f"cka_{which}_se"] = {}, {}
        for a, b in combinations(labels, 2):
            if convs[a] and convs[b]:
                row = _cka_of(cka, a, convs[a][pos], b, convs[b][pos])
                if row is not None:
                    out[f"cka_{which}"][f"{a}~{b}"] = float(row["cka"])
                    out[f"cka_{which}_se"][f"{a}~{b}"] = float(row["se"])
    label_of = {f"r{i}": label for i, label in enumerate(labels)}
    for t in (0.5, 0.8):
        out[f"units_matched_above_{t}"] = {}
    by_pair: dict[str, list[np.ndarray]] = {}
    for (ka, kb), u in sim.units.items():
        key = f"{label_of[ka.split('/', 1)[0]]}~{label_of[kb.split('/', 1)[0]]}"
        by_pair.setdefault(key, []).append(u.one_to_one()["corr"].to_numpy(float))
    for key, parts in by_pair.items():
        corr = np.concatenate(parts)
        for t in (0.5, 0.8):
            out[f"units_matched_above_{t}"][key] = float(np.mean(np.nan_to_num(corr, nan=-1.0) > t))
    return out
