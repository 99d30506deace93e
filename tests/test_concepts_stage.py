"""``probe concepts`` (CRAFT, Fel et al., CVPR 2023) end to end on the tiny run: every saved number checked against an
independent computation (the model's layers called by hand, brute-force maxima and class means, a fresh sample and
fit), the memory bound of the sample, identical bytes on a rerun, and bad configs exiting 2 with the key named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from probe.concepts import (ActivationSample, Concepts, fit_concepts, head_from_layer, k_curve, relative_error,
                            sobol_importance, split_halves_stability)

LIMIT, K, MAX_SAMPLES, TOP, DESIGNS, PER_CLASS, SEED = 120, 4, 3000, 5, 8, 2, 0
ARGS = [f"data.limit={LIMIT}", f"concepts.k={K}", f"concepts.max_samples={MAX_SAMPLES}", f"concepts.top={TOP}",
        f"concepts.n_designs={DESIGNS}", f"concepts.importance_per_class={PER_CLASS}", "concepts.ks=[2,4,6,16]"]
FILES = ["concepts.npz", "concepts.parquet", "top.parquet", "metrics.json", "top_crops.png"]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def args_without(*keys: str) -> list[str]:
    """:data:`ARGS` without the overrides of ``keys`` (a test that sets them itself)."""
    return [a for a in ARGS if a.split("=", 1)[0] not in keys]


def fresh_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("logs", "concepts"))
    return dest


@pytest.fixture(scope="module")
def stage(tiny_run, tmp_path_factory):
    """The stage run once on the tiny run (conv2 by default: its last conv); the folder and its bytes."""
    from probe.pipeline.cli import main

    logs = tmp_path_factory.mktemp("concept_logs")
    assert main(["concepts", f"run={tiny_run}", f"hydra.run.dir={logs}", *ARGS]) == 0
    out = tiny_run / "concepts"
    return out, files(out)


@pytest.fixture(scope="module")
def brute(tiny_run):
    """The analysed images, their labels and conv2's rectified output, computed by calling the layers by hand."""
    from probe.data import dataset_labels
    from probe.pipeline.analysis import run_data
    from probe.pipeline.rundir import load_run

    run = load_run(tiny_run)
    data = run_data(run.card)
    ds = Subset(data.split("test"), list(range(LIMIT)))
    x = torch.stack([ds[i][0] for i in range(LIMIT)])
    m = run.model.eval()
    with torch.no_grad():
        acts = m.conv2(m.pool(m.relu1(m.conv1(x)))).clamp_min(0)
    return {"run": run, "data": data, "ds": ds, "x": x, "labels": dataset_labels(ds), "acts": acts}


def coefficient_maps(W: np.ndarray, acts: torch.Tensor) -> np.ndarray:
    """``(N, k, h, w)``: NNLS coefficients of every position with W fixed, all images in one call."""
    N, C, h, w = acts.shape
    rows = acts.permute(0, 2, 3, 1).reshape(-1, C).numpy()
    U = Concepts(W=W, U=np.zeros((0, len(W)), np.float32)).transform(rows)
    return U.reshape(N, h, w, len(W)).transpose(0, 3, 1, 2)


def test_cli_end_to_end_writes_every_output(stage, brute):
    out, _ = stage
    for f in FILES:
        assert (out / f).is_file(), f
    z = np.load(out / "concepts.npz")
    W = z["W"]
    assert W.shape == (K, 8) and (W >= 0).all()  # conv2 of tiny_cnn has 8 channels
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, rtol=1e-5)
    P = len(z["probe_index"])
    assert z["heatmaps"].shape == (P, K, 16, 16) and (z["heatmaps"] >= 0).all()
    assert z["probe_images"].shape == (P, 1, 16, 16)
    assert z["top_crops"].shape[:3] == (K, TOP, 1) and z["top_crops"].dtype == np.uint8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layer"] == "conv2" and metrics["k"] == K and metrics["channels"] == 8
    assert (metrics["split"], metrics["limit"], metrics["images"]) == ("test", LIMIT, LIMIT)
    assert list(metrics["k_curve"]) == ["2", "4", "6"]  # 16 > 8 channels: clipped
    assert list(z["k_curve_ks"]) == [2, 4, 6]
    assert metrics["rows_seen"] == LIMIT * 8 * 8 and metrics["rows_kept"] == MAX_SAMPLES
    st = metrics["stability"]
    assert st["n"] == K and 0 <= st["k"] <= K and st["value"] == pytest.approx(st["k"] / K)
    table = pd.read_parquet(out / "concepts.parquet")
    assert list(table.columns[:2]) == ["concept", "class"] and {"presence", "importance"} <= set(table.columns)
    assert len(table) == K * 10 and sorted(set(zip(table.concept, table["class"]))) == [(j, c) for j in range(K)
                                                                                       for c in range(10)]
    top = pd.read_parquet(out / "top.parquet")
    assert list(top.columns) == ["concept", "rank", "index", "y", "x", "label", "value"] and len(top) == K * TOP


def test_presence_per_class_is_the_class_mean_of_spatial_mean_coefficients(stage, brute):
    out, _ = stage
    W = np.load(out / "concepts.npz")["W"]
    maps = coefficient_maps(W, brute["acts"])  # (N, k, h, w)
    spatial_mean = maps.astype(np.float64).mean((2, 3))
    z = np.load(out / "concepts.npz")  # what probe compare matches runs by, image by image
    np.testing.assert_allclose(z["image_mean"], spatial_mean, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(z["labels"], brute["labels"])
    table = pd.read_parquet(out / "concepts.parquet")
    for r in table.itertuples():
        members = brute["labels"] == r[2]  # the "class" column
        assert r.images == members.sum()
        assert r.presence == pytest.approx(spatial_mean[members, r.concept].mean(), rel=1e-3, abs=1e-5)
    # the error over every position of the split, with W fixed
    rows = brute["acts"].permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    U = maps.transpose(0, 2, 3, 1).reshape(-1, K)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reconstruction_error_all"] == pytest.approx(relative_error(rows, U, W), rel=1e-4)


def test_top_images_are_the_brute_force_maxima_and_their_crops_the_receptive_field(stage, brute):
    out, _ = stage
    z = np.load(out / "concepts.npz")
    maps = coefficient_maps(z["W"], brute["acts"])
    peak = maps.reshape(LIMIT, K, -1).max(2)  # (N, k)
    top = pd.read_parquet(out / "top.parquet")
    pixels = brute["data"].denormalize(brute["x"]).clamp(0, 1).numpy()
    for j in range(K):
        t = top[top.concept == j].sort_values("rank")
        assert list(t["rank"]) == list(range(TOP))
        np.testing.assert_allclose(t.value, np.sort(peak[:, j])[::-1][:TOP], rtol=1e-3, atol=1e-5)
        for rank, r in enumerate(t.itertuples()):
            assert r.label == brute["labels"][r.index]
            assert maps[r.index, j, r.y, r.x] == pytest.approx(r.value, rel=1e-3, abs=1e-5)  # at the saved position
            top_, left, h, w = z["top_boxes"][j, rank]
            assert 0 <= top_ <= 16 - h and 0 <= left <= 16 - w
            crop = np.round(pixels[r.index, :, top_:top_ + h, left:left + w] * 255)  # 8x8 rf <= crop_size: no resize
            np.testing.assert_array_equal(z["top_crops"][j, rank], crop.astype(np.uint8))


def test_fit_error_curve_and_stability_equal_a_fresh_sample_and_fit(stage, brute):
    out, _ = stage
    metrics = json.loads((out / "metrics.json").read_text())
    sample = ActivationSample(MAX_SAMPLES, SEED)
    for i in range(0, LIMIT, 7):  # other batches than the stage's: the reservoir does not depend on them
        sample.update(brute["acts"][i:i + 7])
    A = sample.matrix()
    c = fit_concepts(A, K, seed=SEED)
    assert metrics["reconstruction_error"] == pytest.approx(relative_error(A, c.U, c.W), rel=1e-4)
    np.testing.assert_allclose(np.load(out / "concepts.npz")["W"], c.W, atol=1e-4)
    curve = k_curve(A, [2, 4, 6], seed=SEED)
    np.testing.assert_allclose([metrics["k_curve"][k] for k in ("2", "4", "6")], curve, rtol=1e-4)
    share = split_halves_stability(A, K, seed=SEED, threshold=0.8)
    assert metrics["stability"]["value"] == pytest.approx(share)


def test_importance_is_the_class_mean_of_sobol_indices_of_the_probe_and_first_images(stage, brute):
    from probe.data import probe_indices

    out, _ = stage
    z = np.load(out / "concepts.npz")
    labels = brute["labels"]
    chosen = set(probe_indices(labels, 1, SEED).tolist())
    for c in range(10):
        chosen |= set(np.flatnonzero(labels == c)[:PER_CLASS].tolist())
    idx = np.array(sorted(chosen))
    np.testing.assert_array_equal(z["importance_index"], idx)
    maps = coefficient_maps(z["W"], brute["acts"][idx])  # (n, k, h, w)
    U = torch.from_numpy(maps.transpose(0, 2, 3, 1).reshape(len(idx), -1, K).copy())
    model = brute["run"].model
    head = head_from_layer(model, "conv2", brute["x"][:1])
    st = sobol_importance(head, U, torch.from_numpy(z["W"]), labels[idx], n_designs=DESIGNS, seed=SEED,
                          spatial=(8, 8), per_image=True)
    table = pd.read_parquet(out / "concepts.parquet")
    for r in table.itertuples():
        members = labels[idx] == r[2]
        assert r.importance_images == members.sum()
        assert r.importance == pytest.approx(st[members, r.concept].mean(), rel=1e-3, abs=1e-4)
    assert (table.importance >= 0).all()


def test_heatmaps_are_the_probe_coefficient_maps_upsampled(stage, brute):
    out, _ = stage
    z = np.load(out / "concepts.npz")
    maps = coefficient_maps(z["W"], brute["acts"][z["probe_index"]])
    up = F.interpolate(torch.from_numpy(maps), size=(16, 16), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(z["heatmaps"], up, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(z["probe_labels"], brute["labels"][z["probe_index"]])


def test_a_second_run_writes_the_same_bytes(stage, tiny_run, tmp_path):
    from probe.pipeline.cli import main

    out, first = stage
    assert set(first) == set(FILES)
    assert main(["concepts", f"run={tiny_run}", f"hydra.run.dir={tmp_path}/logs", *ARGS]) == 0
    assert files(out) == first


def test_the_sample_never_holds_more_than_max_samples_rows(tiny_run, tmp_path, monkeypatch):
    """With a small ``max_samples`` the reservoir keeps exactly that many of the many rows it sees, at every update."""
    import probe.pipeline.concepts.stage as S
    from probe.pipeline.cli import main

    held = []

    class Watched(ActivationSample):
        def update(self, acts):
            super().update(acts)
            held.append((len(self.matrix()), self._rows.shape[0]))

    monkeypatch.setattr(S, "ActivationSample", Watched)
    run = fresh_copy(tiny_run, tmp_path / "run")
    assert main(["concepts", f"run={run}", f"hydra.run.dir={tmp_path}/logs", "concepts.max_samples=100",
                 "data.batch_size=32", *args_without("concepts.max_samples")]) == 0
    metrics = json.loads((run / "concepts" / "metrics.json").read_text())
    assert metrics["rows_kept"] == metrics["max_samples"] == 100
    assert metrics["rows_seen"] == LIMIT * 64 > 100
    assert len(held) == -(-LIMIT // 32) and max(n for n, _ in held) == 100 and {a for _, a in held} == {100}


@pytest.mark.parametrize("override,names", [
    ("concepts.layer=conv_9", ["concepts.layer", "conv_9", "valid layers", "conv1", "conv2"]),
    ("concepts.k=9", ["concepts.k", "9", "8 channels"]),
    ("concepts.n_designs=12", ["concepts.n_designs", "power of two"]),
])
def test_bad_config_exits_2(tiny_run, tmp_path, capsys, override, names):
    from probe.pipeline.cli import main

    run = fresh_copy(tiny_run, tmp_path / "run")
    assert main(["concepts", f"run={run}", f"hydra.run.dir={tmp_path}/logs", *args_without(override.split("=")[0]),
                 override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("probe concepts: error: ") and all(n in err for n in names), err
    assert not (run / "concepts").exists()
