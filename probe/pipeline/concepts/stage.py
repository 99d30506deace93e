"""``probe concepts run=<run dir>``: the concepts one layer uses, CRAFT-style -> ``<run>/concepts/``.

CRAFT (Fel et al., "CRAFT: Concept Recursive Activation FacTorization for Explainability", CVPR 2023,
arXiv:2211.10154), on the run's analysed split (``data.split``, ``data.limit``), with the library
:mod:`probe.concepts`. The choices CRAFT leaves open, or makes otherwise, are:

- **Layer** (``concepts.layer``; None: the model's last ``nn.Conv2d``, ``probe.hooks.conv_layers(model)[-1]``,
  late enough for the head to be short and the concepts to be about parts of objects, as CRAFT's late layer).
  The layer must give a map ``(N, C, H, W)``. Its output is captured by a forward hook and rectified
  (clamped at 0): for a conv followed by a ReLU that is the ReLU's output. For a conv followed by batch norm,
  or inside a residual block, name a block's output instead (``probe.concepts.head_from_layer``).
- **Samples** (Sec. 3.1): one sample is one spatial position of one image (a ``C``-vector), not CRAFT's
  average-pooled random crops. Every position of every image is offered to a reservoir of ``max_samples``
  rows (``ActivationSample``, seeded by ``seed``): a uniform sample of the split's positions in bounded memory.
- **Factorisation** (Sec. 3.1): ``A ~ U W`` by ``fit_concepts`` (scikit-learn NMF, Frobenius loss, ``nndsvda``
  init, coordinate descent, ``random_state=seed``); rows of ``W`` unit-norm, concepts ordered by their total
  coefficient on the sample. Coefficients of other activations: non-negative least squares with ``W`` fixed
  (``Concepts.transform``), per batch of ``data.batch_size`` images.
- **Presence** (CRAFT has none): per concept and class, the mean over the class's images of the concept's
  spatial mean coefficient. **Top images**: by the concept's maximum coefficient over positions (ties: the
  lower image index), cropped to the layer's receptive field around the position of that maximum, exactly as
  the activations stage crops a unit's exemplars (``probe.activations.exemplars.crop_boxes``/``crop_images``).
- **Importance** (Sec. 3.2): CRAFT's total Sobol index of each concept for the class score, by masking the
  concept coefficients in the layer: masks ``M`` in ``[0, 1]^k`` from a scrambled Sobol' sequence
  (``n_designs`` per image), activations ``(U * M) W`` sent through the rest of the model
  (``head_from_layer``), Jansen's estimator per image (``sobol_importance``). One mask value per concept per
  image, shared by all its positions. The explained score is the logit (before a final softmax) of the image's **true**
  class; the images are bounded: the fixed probe images and the first ``importance_per_class`` images of each
  class in the split (in split order); a class's row is the mean over its images (NaN for a class with none).
- **Heatmaps**: the coefficient maps of the fixed probe images, upsampled (bilinear, ``align_corners=False``)
  to the image size; CRAFT's concept attribution maps use the same coefficients.
- **Quality** (CRAFT has none of these): the relative reconstruction error ``||A - U W||_F / ||A||_F`` of the
  fit on its sample, and of every position of the split with ``W`` fixed; the same fit error for each ``k`` of
  ``ks`` no larger than the channels (the k-curve); split-half stability (``split_halves_stability``: fits on
  two disjoint random halves of the sample, Hungarian matching, the share of concepts matched with cosine above
  ``stability_threshold``, 0.8), with Wilson's interval.

The split is streamed twice (the sample for the fit, then the coefficients of every image); per image only
the mean, maximum and arg-maximum of each concept's coefficients are kept, never the maps. The means are
written (``image_mean``, with the images' ``labels``): ``probe compare`` matches the concepts of two runs by their
correlation over the same images (:func:`probe.concepts.match_by_coefficients`).

Outputs: ``concepts.npz`` (``W``, ``image_mean``, ``labels``, the probe images and their ``heatmaps``, ``top_crops``
and ``top_boxes``, ``presence``, ``importance`` and the images it was computed on, the k-curve),
``concepts.parquet`` (one row per concept and class: :data:`CONCEPT_COLUMNS`), ``top.parquet`` (one row per concept
and rank: :data:`TOP_COLUMNS`), ``metrics.json`` (the fit, the k-curve, stability) and ``top_crops.png``. Same
config and seed: the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from probe.activations.exemplars import crop_boxes, crop_images
from probe.activations.pictures import tile, upscale
from probe.concepts import (ActivationSample, Concepts, activation_rows, fit_concepts, head_from_layer, k_curve,
                            relative_error, sobol_importance, split_halves_stability)
from probe.errors import ConfigError
from probe.files import write_json, write_npz
from probe.hooks import check_layers, conv_layers, layer_outputs
from probe.pipeline.analysis import Context, open_run
from probe.pipeline.concepts.config import ConceptsConfig, ConceptsStage
from probe.pipeline.rundir import staged_dir, stamped
from probe.runtime import pin_memory
from probe.uncertainty import proportion_interval

log = logging.getLogger(__name__)

OUTPUT = "concepts"
CONCEPT_COLUMNS = ["concept", "class", "class_name", "images", "presence", "importance_images", "importance"]
TOP_COLUMNS = ["concept", "rank", "index", "y", "x", "label", "value"]


# -- the layer ----------------------------------------------------------------------------------------
def choose_layer(model: nn.Module, layer: str | None) -> str:
    """``layer`` checked against the model, or (None) the model's last ``nn.Conv2d``."""
    if layer is not None:
        return check_layers(model, [layer], key="concepts.layer")[0]
    convs = conv_layers(model)
    if not convs:
        raise ConfigError("concepts.layer: the model has no nn.Conv2d to default to; name a layer whose output "
                          "is a map (N, C, H, W)")
    return convs[-1]


@torch.no_grad()
def layer_maps(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's output for ``x`` (float32, on the CPU, not rectified), the model run only up to it."""
    _, acts = layer_outputs(model, x, [layer], output=False)
    if layer not in acts:
        raise ConfigError(f"concepts.layer: '{layer}' gives no tensor output; pick a layer whose output is a map")
    return acts[layer].float().cpu()


def layer_shape(ctx: Context, layer: str) -> tuple[int, int, int]:
    """``(C, h, w)`` of the layer's output; a :class:`ConfigError` naming ``concepts.layer`` unless it is a map."""
    out = layer_maps(ctx.run.model, ctx.probe_x[:1].to(ctx.device), layer)
    if out.ndim != 4:
        raise ConfigError(f"concepts.layer: '{layer}' gives outputs of shape {tuple(out.shape)}; concepts need a "
                          f"map (N, C, H, W): pick a conv layer or a block's output")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def check_k(c: ConceptsConfig, layer: str, channels: int) -> None:
    if c.k > channels:
        raise ConfigError(f"concepts.k: {c.k} is out of range; layer '{layer}' has {channels} channels: "
                          f"must be <= {channels}")


def batches(ctx: Context, batch_size: int):
    """``(x on the device, labels)`` of the analysed split in its order, ``batch_size`` images at a time."""
    loader = DataLoader(ctx.dataset, batch_size=batch_size, shuffle=False, pin_memory=pin_memory(ctx.device))
    for x, y in loader:
        yield x.to(ctx.device), y


# -- pass 1: the sample and the fit -------------------------------------------------------------------
def collect_sample(ctx: Context, layer: str, max_samples: int, seed: int, batch_size: int) -> ActivationSample:
    """Every position of every image offered to a reservoir of ``max_samples`` rectified rows (CRAFT Sec. 3.1's
    activations, one row per position)."""
    sample = ActivationSample(max_samples, seed)
    for x, _ in batches(ctx, batch_size):
        sample.update(layer_maps(ctx.run.model, x, layer))
    return sample


def fit(A: np.ndarray, c: ConceptsConfig, seed: int) -> Concepts:
    if len(A) < c.k:
        raise ConfigError(f"concepts.k: {c.k} is out of range; only {len(A)} activation rows were kept "
                          f"(raise concepts.max_samples or data.limit)")
    return fit_concepts(A, c.k, seed=seed)


# -- pass 2: coefficients of every image --------------------------------------------------------------
@dataclass
class ImageSummary:
    """Per image of the split and concept ``(N, k)``: the spatial mean and maximum of the concept's coefficient
    map, the flat position of the maximum (row-major, first one on ties); and over every position of the split,
    the squared norms of the activations and of their residuals after ``U W`` (float64 sums)."""

    mean: np.ndarray
    max: np.ndarray
    argmax: np.ndarray
    residual: float
    total: float

    @property
    def relative_error(self) -> float:
        """``||A - U W||_F / ||A||_F`` over every position of the split, ``U`` by NNLS with ``W`` fixed."""
        return float(np.sqrt(self.residual / self.total)) if self.total > 0 else 0.0


def summarise_images(ctx: Context, layer: str, concepts: Concepts, batch_size: int) -> ImageSummary:
    means, maxima, argmax = [], [], []
    residual = total = 0.0
    W = concepts.W.astype(np.float64)
    for x, _ in batches(ctx, batch_size):
        acts = layer_maps(ctx.run.model, x, layer)
        rows = activation_rows(acts)
        U = concepts.transform(rows)
        residual += float(np.square(rows - U.astype(np.float64) @ W).sum())
        total += float(np.square(rows.astype(np.float64)).sum())
        maps = U.reshape(len(acts), -1, concepts.k)  # (N, h*w, k)
        means.append(maps.astype(np.float64).mean(1))
        maxima.append(maps.max(1))
        argmax.append(maps.argmax(1))
    return ImageSummary(np.concatenate(means), np.concatenate(maxima), np.concatenate(argmax), residual, total)


def class_presence(mean: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, k)`` mean over each class's images of each concept's spatial mean coefficient (NaN for a class
    without images), and ``(classes,)`` the image counts."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    out = np.full((num_classes, mean.shape[1]), np.nan)
    for c in np.flatnonzero(counts):
        out[c] = mean[labels == c].mean(0)
    return out, counts


def top_table(s: ImageSummary, top: int, labels: np.ndarray, width: int) -> pd.DataFrame:
    """The ``top`` images of each concept by maximum coefficient, descending, ties by the lower image index;
    ``(y, x)`` the position of that maximum in the layer's map."""
    rows = []
    index = np.arange(len(s.max))
    for j in range(s.max.shape[1]):
        order = np.lexsort((index, -s.max[:, j].astype(np.float64)))[:top]
        pos = s.argmax[order, j].astype(np.int64)
        rows.append(pd.DataFrame({"concept": j, "rank": np.arange(len(order)), "index": order.astype(np.int64),
                                  "y": pos // width, "x": pos % width, "label": labels[order].astype(np.int64),
                                  "value": s.max[order, j].astype(np.float64)}))
    return pd.concat(rows, ignore_index=True)[TOP_COLUMNS]


def top_crops(ctx: Context, layer: str, top: pd.DataFrame, size: tuple[int, int],
              crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Receptive-field crops ``(k, top, C, s, s)`` uint8 and boxes ``(k, top, 4)`` (top, left, height, width) of the
    top images at the position of their maximum: the activations stage's exemplar crops, the same geometry."""
    from probe.pipeline.activations.stage import unit_geometry

    rf, stride, c0 = unit_geometry(ctx, [layer])[layer]
    H, W = ctx.probe_x.shape[-2:]
    h, w = size
    if c0 is None:  # no traced geometry: the map centred on the input (as the activations stage)
        c0 = ((H - 1) / 2 - (h - 1) / 2 * stride[0], (W - 1) / 2 - (w - 1) / 2 * stride[1])
    boxes = crop_boxes(top["y"].to_numpy(), top["x"].to_numpy(), rf, stride, c0, (H, W))
    pixels = torch.stack([ctx.data.denormalize(ctx.dataset[int(i)][0][None])[0].clamp(0, 1) for i in top["index"]])
    crops = crop_images(pixels, boxes, crop_size)
    k, n = int(top["concept"].max()) + 1, int(top["rank"].max()) + 1
    return crops.reshape(k, n, *crops.shape[1:]), boxes.reshape(k, n, 4)


# -- importance ---------------------------------------------------------------------------------------
def importance_indices(labels: np.ndarray, probe_index: np.ndarray, per_class: int) -> np.ndarray:
    """The images whose Sobol indices are computed: the probe images and the first ``per_class`` of each class
    (in split order), sorted, each once."""
    first = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    return np.unique(np.concatenate([np.asarray(probe_index, np.int64), *first]).astype(np.int64))


def class_importance(ctx: Context, layer: str, concepts: Concepts, index: np.ndarray, n_designs: int, seed: int,
                     batch_size: int, num_classes: int) -> np.ndarray:
    """``(classes, k)`` CRAFT's total Sobol index of each concept for the true class's logit (the score before a
    final (log-)softmax, :func:`probe.concepts.head_from_layer`), by masking the concept coefficients of the images
    ``index`` in the layer (Sec. 3.2); the mean over each class's images, NaN for a class without any."""
    model = ctx.run.model
    x = torch.stack([ctx.dataset[int(i)][0] for i in index])
    acts = torch.cat([layer_maps(model, x[i:i + batch_size].to(ctx.device), layer)
                      for i in range(0, len(x), batch_size)])
    U = torch.from_numpy(concepts.transform_maps(acts)).to(ctx.device)
    labels = ctx.labels[index].astype(np.int64)
    head = head_from_layer(model, layer, ctx.probe_x[:1].to(ctx.device))
    per_class = sobol_importance(head, U, torch.from_numpy(concepts.W), labels, n_designs=n_designs, seed=seed,
                                 spatial=tuple(acts.shape[2:]), batch_size=batch_size)
    out = np.full((num_classes, concepts.k), np.nan)
    out[np.unique(labels)] = per_class
    return out


# -- heatmaps -----------------------------------------------------------------------------------------
def probe_heatmaps(ctx: Context, layer: str, concepts: Concepts) -> np.ndarray:
    """``(P, k, H, W)`` float32: each concept's coefficient map on each probe image, upsampled (bilinear) to the
    image size."""
    acts = layer_maps(ctx.run.model, ctx.probe_x.to(ctx.device), layer)
    P, _, h, w = acts.shape
    maps = torch.from_numpy(concepts.transform_maps(acts)).reshape(P, h, w, concepts.k).permute(0, 3, 1, 2)
    up = F.interpolate(maps.contiguous(), size=tuple(ctx.probe_x.shape[-2:]), mode="bilinear", align_corners=False)
    return up.numpy().astype(np.float32)


# -- quality ------------------------------------------------------------------------------------------
def curve_ks(ks: list[int], channels: int, rows: int) -> list[int]:
    """The k-curve's ``ks`` that the layer allows (``<= channels`` and ``<= rows``), each once, in the given order."""
    return [k for k in dict.fromkeys(ks) if k <= min(channels, rows)]


def stability(A: np.ndarray, c: ConceptsConfig, seed: int) -> dict:
    """Split-half stability: the share of concepts matched above the threshold between fits on two halves, with
    Wilson's interval, ``k`` matched of ``n`` concepts."""
    if len(A) // 2 < c.k:
        raise ConfigError(f"concepts.stability: {len(A)} activation rows cannot be split into two halves of at "
                          f"least concepts.k = {c.k}; raise concepts.max_samples or data.limit, or set "
                          f"concepts.stability=false")
    share = split_halves_stability(A, c.k, seed=seed, threshold=c.stability_threshold)
    matched = int(round(share * c.k))
    return {**proportion_interval(matched, c.k).to_dict(), "k": matched, "threshold": c.stability_threshold}


# -- outputs ------------------------------------------------------------------------------------------
def concept_table(presence: np.ndarray, counts: np.ndarray, importance: np.ndarray, imp_labels: np.ndarray,
                  classes: list[str]) -> pd.DataFrame:
    """One row per concept and class (concept-major)."""
    n_cls, k = presence.shape
    imp_counts = np.bincount(imp_labels, minlength=n_cls)[:n_cls]
    names = [classes[c] if c < len(classes) else str(c) for c in range(n_cls)]
    df = pd.DataFrame({"concept": np.repeat(np.arange(k), n_cls), "class": np.tile(np.arange(n_cls), k),
                       "class_name": pd.array(np.tile(names, k), dtype="string"),
                       "images": np.tile(counts, k).astype(np.int64), "presence": presence.T.reshape(-1),
                       "importance_images": np.tile(imp_counts, k).astype(np.int64),
                       "importance": importance.T.reshape(-1)})
    return df[CONCEPT_COLUMNS]


def save_crop_grid(path: Path, crops: np.ndarray, layer: str) -> None:
    """``crops`` uint8 ``(k, top, C, s, s)``: one row per concept, its top images left to right."""
    rgb = np.repeat(crops, 3, axis=2) if crops.shape[2] == 1 else crops
    rows = [[t.transpose(1, 2, 0) for t in concept] for concept in rgb]
    title = f"{layer}: rows = concepts 0-{len(crops) - 1}, cols = top-{crops.shape[1]} images (crop = receptive field)"
    tile(rows, title, upscale(crops.shape[3])).save(path)


def run(cfg: ConceptsStage) -> Path:
    """Concepts of ``cfg.concepts.layer`` on the analysed split -> ``<run>/concepts/``."""
    ctx = open_run(cfg)
    c, seed, bs = cfg.concepts, cfg.seed, cfg.data.batch_size
    layer = choose_layer(ctx.run.model, c.layer)
    channels, h, w = layer_shape(ctx, layer)
    check_k(c, layer, channels)
    num_classes = max(ctx.data.num_classes, int(ctx.labels.max()) + 1)

    log.info("concepts: %s (%d channels, %dx%d), %d images, sampling up to %d positions", layer, channels, h, w,
             len(ctx.dataset), c.max_samples)
    sample = collect_sample(ctx, layer, c.max_samples, seed, bs)
    A = sample.matrix()
    concepts = fit(A, c, seed)
    log.info("concepts: %d concepts fitted on %d of %d positions; coefficients of every image", c.k, len(A),
             sample.seen)
    summary = summarise_images(ctx, layer, concepts, bs)
    presence, counts = class_presence(summary.mean, ctx.labels, num_classes)
    top = top_table(summary, c.top, ctx.labels, w)
    crops, boxes = top_crops(ctx, layer, top, (h, w), c.crop_size)
    imp_index = importance_indices(ctx.labels, ctx.probe_index, c.importance_per_class)
    log.info("concepts: Sobol importance on %d images, %d designs", len(imp_index), c.n_designs)
    importance = class_importance(ctx, layer, concepts, imp_index, c.n_designs, seed, bs, num_classes)
    heatmaps = probe_heatmaps(ctx, layer, concepts)
    ks = curve_ks(c.ks, channels, len(A))
    curve = k_curve(A, ks, seed=seed) if ks else np.zeros(0)

    metrics = {"layer": layer, "k": c.k, "channels": channels, "map": [h, w], "split": cfg.data.split,
               "limit": cfg.data.limit, "images": len(ctx.dataset),
               "max_samples": c.max_samples, "rows_seen": int(sample.seen), "rows_kept": len(A),
               "reconstruction_error": relative_error(A, concepts.U, concepts.W),
               "reconstruction_error_all": summary.relative_error,
               "k_curve": {str(k): float(e) for k, e in zip(ks, curve)},
               "importance": {"images": len(imp_index), "n_designs": c.n_designs}}
    if c.stability:
        metrics["stability"] = stability(A, c, seed)
    arrays = {"W": concepts.W, "image_mean": summary.mean.astype(np.float32), "labels": ctx.labels.astype(np.int64),
              "heatmaps": heatmaps, "probe_index": np.asarray(ctx.probe_index, np.int64),
              "probe_labels": ctx.probe_y.numpy().astype(np.int64),
              "probe_images": ctx.data.denormalize(ctx.probe_x).clamp(0, 1).numpy().astype(np.float32),
              "top_crops": crops, "top_boxes": boxes, "k_curve_ks": np.asarray(ks, np.int64),
              "k_curve_error": np.asarray(curve, np.float64), "presence": presence, "importance": importance,
              "importance_index": imp_index}
    with staged_dir(ctx.run.path / OUTPUT) as tmp:
        write_npz(tmp / "concepts.npz", arrays)
        concept_table(presence, counts, importance, ctx.labels[imp_index], ctx.data.classes).to_parquet(
            tmp / "concepts.parquet", index=False)
        top.to_parquet(tmp / "top.parquet", index=False)
        write_json(tmp / "metrics.json", stamped(ctx.run.path, metrics))
        save_crop_grid(tmp / "top_crops.png", crops, layer)
    log.info("concepts: reconstruction error %.3f (fit), %.3f (every position)%s", metrics["reconstruction_error"],
             metrics["reconstruction_error_all"],
             f"; {metrics['stability']['k']} of {c.k} concepts stable" if c.stability else "")
    return ctx.run.path / OUTPUT
