"""probe.activations against brute force on all activations held in memory.

Tolerances: counts, min, max, frac_active, dead, histograms and exemplar indices exact; mean and
class means rtol 1e-5 and std rtol 1e-4 (float64 sums of float32 values);
quantiles: the estimate lies in the grid bin (relative width 2^-bits) of the order statistic of
rank floor(q (n - 1)), and within one bin plus the gap to the next order statistic of
numpy's interpolated quantile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import redirect_stderr
from io import StringIO

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from probe.activations import LogGrid, PopulationStats, TopK, collect
from probe.activations import stats as stats_module
from probe.activations.exemplars import rank_key
from probe.activations.kernel import SUB
from probe.activations.stats import selectivity

K_CLASSES = 4


class Net(nn.Module):
    """conv -> in-place ReLU (so hooks must read conv1 before it is overwritten) -> pool -> conv -> eval BN
    -> functional ReLU -> linear. Rectified responses: conv1 relu, conv2 bn+relu, bn relu; pool, fc none."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(5, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 2, 7)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(F.relu(self.bn(self.conv2(x))), 1))

    def brute(self, x) -> dict[str, torch.Tensor]:
        """Every layer's output for all of ``x`` at once, computed without hooks."""
        c1 = self.conv1(x)
        p = self.pool(torch.relu(c1))
        c2 = self.conv2(p)
        b = self.bn(c2)
        return {"conv1": c1, "pool": p, "conv2": c2, "bn": b, "fc": self.fc(torch.flatten(torch.relu(b), 1))[:, :, None, None]}

    def brute_rectified(self, acts: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        """Each layer's rectified response by hand: the net's own ReLU of its own BN (float32, as it runs)."""
        with torch.no_grad():
            bn_relu = torch.relu(self.bn(torch.from_numpy(acts["conv2"]).float())).numpy().astype(np.float64)
        return {"conv1": np.maximum(acts["conv1"], 0), "pool": None, "conv2": bn_relu,
                "bn": np.maximum(acts["bn"], 0), "fc": None}


LAYERS = ["conv1", "pool", "conv2", "bn", "fc"]
RECTIFIED = {"conv1": "relu", "pool": None, "conv2": "bn+relu", "bn": "relu", "fc": None}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.conv2.bias[0] = -100.0  # never > 0 before the BN, but its gamma < 0: alive after bn+relu
        model.bn.running_mean.copy_(torch.tensor([-100.0, 0.3, -0.2, 0.0, 0.1, 0.5]))
        model.bn.running_var.copy_(torch.tensor([4.0, 0.5, 2.0, 1.0, 0.25, 3.0]))
        model.bn.weight.copy_(torch.tensor([-1.5, 2.0, 0.7, -0.4, 1.0, 0.0]))  # negative and zero gammas
        model.bn.bias.copy_(torch.tensor([0.1, -100.0, 0.2, 0.3, -0.1, 0.5]))  # channel 1: dead after the BN
    x = torch.randn(45, 2, 9, 9)
    y = torch.randint(0, K_CLASSES, (45,))
    y[:K_CLASSES] = torch.arange(K_CLASSES)
    with torch.no_grad():
        acts = {k: v.numpy().astype(np.float64) for k, v in model.brute(x).items()}
    return model, x, y, acts


@pytest.fixture(params=["kernel", "torch"])
def reduction(request, monkeypatch):
    """The one-pass CPU kernel, and the torch ops that run on CUDA (here on the CPU)."""
    monkeypatch.setattr(stats_module, "FUSED_CPU", request.param == "kernel")
    return request.param


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def run(model, x, y, size=8, start=0, grid=None, stride=1, k=3):
    return collect(model, batches(x, y, size), LAYERS, torch.device("cpu"), K_CLASSES, grid or LogGrid(),
                   top_k=k, hist_stride=stride, start=start)


def brute_quantile_ok(est, flat, q, grid):
    """``est`` (C,) against the sorted values ``flat`` (C, n) of each channel."""
    srt = np.sort(flat.astype(np.float32), axis=1)
    r = q * (srt.shape[1] - 1)
    below, above = srt[:, int(np.floor(r))], srt[:, int(np.ceil(r))]
    b = grid.bin_of(below)
    in_bin = (est >= np.maximum(grid.lo[b], srt[:, 0])) & (est <= np.minimum(grid.hi[b], srt[:, -1]))
    exact = np.quantile(flat, q, axis=1)
    width = np.minimum(grid.hi[b], srt[:, -1]) - np.maximum(grid.lo[b], srt[:, 0])
    return in_bin & (np.abs(est - exact) <= width + (above - below) + 1e-9)


def test_grid_bins_are_ordered_and_contain_their_values():
    g = LogGrid(bits=3, octaves=10)
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(20000) * np.exp(rng.standard_normal(20000) * 6),
                        [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf, 1.0, -1.0, 2.0**-10, 2.0**10]])
    v = v.astype(np.float32)
    fast = g.lut[g.keys(torch.from_numpy(v)).numpy().astype(np.int64) + g.half]
    assert np.array_equal(fast, g.bin_of(v))
    order = np.lexsort((~np.signbit(v), v))  # by value, -0.0 before +0.0
    assert np.all(np.diff(fast[order]) >= 0)  # bins increase with the value
    assert np.all((v >= g.lo[fast]) & (v <= g.hi[fast]))
    assert np.all((fast >= g.first_active) == (v > 0))
    assert np.all(np.diff(g.lo) >= 0) and np.all(g.hi >= g.lo)


def test_every_statistic_matches_brute_force(setup, reduction):
    model, x, y, acts = setup
    stats, _ = run(model, x, y, size=8)
    grid = LogGrid()
    yn = y.numpy()
    rectified = model.brute_rectified(acts)
    for name in LAYERS:
        a = acts[name]  # (N, C, H, W)
        N, C, H, W = a.shape
        flat = a.transpose(1, 0, 2, 3).reshape(C, -1)
        f = stats[name].to_frame()
        assert (f["count"] == N * H * W).all()
        np.testing.assert_allclose(f["mean"], flat.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["std"], flat.std(1), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(f["min"], flat.min(1).astype(np.float32))
        np.testing.assert_array_equal(f["max"], flat.max(1).astype(np.float32))
        np.testing.assert_array_equal(f["frac_active"], (flat > 0).mean(1))
        for col, q in (("q01", 0.01), ("q50", 0.5), ("q99", 0.99)):
            assert brute_quantile_ok(f[col].to_numpy(), flat, q, grid).all(), (name, col)
        # per-class means (raw and rectified) and the selectivity index of the rectified one, written out independently
        means = np.stack([a[yn == k].mean((0, 2, 3)) for k in range(K_CLASSES)])
        cf = stats[name].class_frame()
        cm = cf.pivot(index="class", columns="channel", values="mean").to_numpy()
        np.testing.assert_allclose(cm, means, rtol=1e-5, atol=1e-6)
        r = rectified[name]
        assert f["rectified"].isna().all() if r is None else (f["rectified"] == RECTIFIED[name]).all()
        if r is None:  # undefined: null, never a number
            assert f["dead"].isna().all() and f["selectivity"].isna().all() and f["frac_active_rectified"].isna().all()
            assert cf["mean_rectified"].isna().all()
            continue
        rflat = r.transpose(1, 0, 2, 3).reshape(C, -1)
        np.testing.assert_array_equal(f["dead"].to_numpy(bool), ~(rflat > 0).any(1))
        np.testing.assert_array_equal(f["frac_active_rectified"], (rflat > 0).mean(1))
        rmeans = np.stack([r[yn == k].mean((0, 2, 3)) for k in range(K_CLASSES)])
        rm = cf.pivot(index="class", columns="channel", values="mean_rectified").to_numpy()
        np.testing.assert_allclose(rm, rmeans, rtol=1e-5, atol=1e-6)
        for c in range(C):
            top = rmeans[:, c].max()
            rest = (rmeans[:, c].sum() - top) / (K_CLASSES - 1)
            want = (top - rest) / (top + rest) if top + rest > 1e-12 else np.nan
            np.testing.assert_allclose(f["selectivity"][c], want, rtol=1e-4, atol=1e-6)
            assert np.isnan(want) or 0 <= f["selectivity"][c] <= 1
        # histogram: per layer and per channel, exact
        bins = grid.bin_of(a.astype(np.float32).transpose(1, 0, 2, 3).reshape(C, -1))
        per_channel = np.stack([np.bincount(b, minlength=grid.bins) for b in bins])
        np.testing.assert_array_equal(stats[name].hist.numpy(), per_channel)
        h = stats[name].hist_frame(per_channel=True)
        layer = h[h.channel == -1]
        np.testing.assert_array_equal(layer["count"], per_channel.sum(0)[layer["bin"]])
        assert layer["count"].sum() == N * C * H * W
    conv2 = stats["conv2"].to_frame()
    assert conv2["max"][0] < 0 and not conv2["dead"][0]  # never > 0 before the BN, alive after it (gamma < 0)
    assert conv2["max"][1] > 0 and conv2["dead"][1]  # active before the BN, dead after it (beta = -100)
    assert conv2["selectivity"][5] == 0  # gamma = 0: the same response (relu(beta)) for every class


def test_inplace_relu_does_not_corrupt_statistics(setup, reduction):
    """conv1 is followed by ReLU(inplace=True): the statistics must see its negative outputs."""
    model, x, y, acts = setup
    stats, tops = run(model, x, y)
    f = stats["conv1"].to_frame()
    assert (f["min"] < 0).all()
    np.testing.assert_array_equal(f["min"], acts["conv1"].min((0, 2, 3)).astype(np.float32))
    np.testing.assert_array_less(f["frac_active"], 1.0)
    # the ReLU that ran in place still produced the right model output
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), acts["fc"][:, :, 0, 0], rtol=1e-5, atol=1e-5)


def test_exemplars_are_the_brute_force_top_k(setup, reduction):
    model, x, y, acts = setup
    k = 4
    _, tops = run(model, x, y, size=7, k=k)
    for name in LAYERS:
        a = acts[name].astype(np.float32)
        N, C, H, W = a.shape
        spatial_mean = a.reshape(N, C, -1).astype(np.float64).mean(2)
        got = tops[name].to_frame(W, y.numpy())
        assert list(got.columns) == ["layer", "channel", "rank", "index", "value", "max_value", "y", "x", "label"]
        for c in range(C):
            order = np.lexsort((np.arange(N), -spatial_mean[:, c]))[:k]  # value desc, then index asc
            g = got[got.channel == c].sort_values("rank")
            assert g["rank"].tolist() == list(range(k))
            np.testing.assert_allclose(g["value"], spatial_mean[order, c], rtol=1e-5, atol=1e-6)
            # the chosen images are the top-k (ties could reorder equal values only)
            np.testing.assert_allclose(np.sort(spatial_mean[g["index"], c]), np.sort(spatial_mean[order, c]), rtol=1e-5, atol=1e-6)
            maps = a[g["index"].to_numpy(), c].reshape(k, -1)
            np.testing.assert_array_equal(g["max_value"], maps.max(1))
            np.testing.assert_array_equal(maps[np.arange(k), g["y"] * W + g["x"]], maps.max(1))
            np.testing.assert_array_equal(g["label"], y.numpy()[g["index"]])
    # ties (equal spatial means) go to the lowest image index
    flat = torch.zeros(10, 2, 1, 1)
    flat[7, 1] = 1.0
    top = TopK("t", 3)
    for start in (0, 4, 8):
        s = flat[start : start + 4]
        from probe.activations.exemplars import BatchSummary

        top.update(BatchSummary(s[:, :, 0, 0], s[:, :, 0, 0], torch.zeros(len(s), 2, dtype=torch.long)), start)
    f = top.to_frame(1, np.zeros(10, dtype=int))
    assert f[f.channel == 0]["index"].tolist() == [0, 1, 2]
    assert f[f.channel == 1]["index"].tolist() == [7, 0, 1]



def test_batches_after_a_merge_count_like_one_pass(reduction):
    """update, merge, update: the batches after the merge land in the merged state (the kernel
    keeps views of the state, so merging must not replace it)."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 3, 4, 4), torch.randint(0, 2, (30,))

    def fresh():
        return stats_module.LayerStats("l", LogGrid(), 2), TopK("l", 4)

    whole, whole_top = fresh()
    for i in (0, 10, 20):
        whole.update(x[i : i + 10], y[i : i + 10], whole_top, i)
    s, top = fresh()
    s.update(x[:10], y[:10], top, 0)
    other, other_top = fresh()
    other.update(x[10:20], y[10:20], other_top, 10)
    s.merge(other)
    top.merge(other_top)
    s.update(x[20:], y[20:], top, 20)
    for f in ("min", "max", "hist", "active", "class_images"):
        assert torch.equal(getattr(s, f), getattr(whole, f)), f
    torch.testing.assert_close(s.sum, whole.sum, rtol=1e-12, atol=1e-12)
    for c in ("index", "argmax", "max_value"):
        np.testing.assert_array_equal(top.state()[c], whole_top.state()[c])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 3])
def test_merge_of_random_splits_equals_one_pass(setup, reduction, seed, stride, tmp_path):
    """merge(stats(A), stats(B), ...) == stats(A + B + ...), on the very same batches (a conv's float
    rounding may depend on the batch size, which is not what this tests)."""
    model, x, y, _ = setup
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=2, replace=False))
    shards = []
    for lo, hi in zip([0, *cuts], [*cuts, len(x)]):
        size = int(rng.integers(1, 12))
        shards.append((int(lo), [(x[i : min(i + size, hi)], y[i : min(i + size, hi)]) for i in range(lo, hi, size)]))
    cpu = torch.device("cpu")
    whole, whole_top = collect(model, [b for _, bs in shards for b in bs], LAYERS, cpu, K_CLASSES, top_k=3, hist_stride=stride)
    parts = [collect(model, bs, LAYERS, cpu, K_CLASSES, top_k=3, hist_stride=stride, start=lo) for lo, bs in shards]
    # shard 0 goes through a save / load round trip, as a sharded run would
    parts[0][0].save(tmp_path / "shard0.npz")
    merged = PopulationStats.load(tmp_path / "shard0.npz")
    tops = {n: TopK.from_state(n, 3, parts[0][1][n].state()) for n in LAYERS}
    for stats, top in parts[1:][::-1]:  # any order
        merged.merge(stats)
        for n in LAYERS:
            tops[n].merge(top[n])
    for n in LAYERS:
        a, b = whole[n], merged[n]
        assert (a.count, a.hist_count, a.images) == (b.count, b.hist_count, b.images)
        for field in ("min", "max", "hist", "active", "class_images"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (n, field)
        for field in ("sum", "class_sum"):  # float64 sums, grouped differently: float tolerance
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-6)
        fa, fb = a.to_frame(), b.to_frame()
        np.testing.assert_allclose(fa["mean"], fb["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fa["std"], fb["std"], rtol=1e-5, atol=1e-7)
        pd.testing.assert_frame_equal(fa.drop(columns=["mean", "std", "selectivity"]), fb.drop(columns=["mean", "std", "selectivity"]))
        pd.testing.assert_frame_equal(whole_top[n].to_frame(a.shape[1], y.numpy()), tops[n].to_frame(a.shape[1], y.numpy()))


def test_hist_stride_keeps_exact_activity_and_subsamples_histogram(setup, reduction):
    model, x, y, acts = setup
    stats, _ = run(model, x, y, stride=3)
    a = acts["conv1"]
    N, C, H, W = a.shape
    f = stats["conv1"].to_frame()
    flat = a.transpose(1, 0, 2, 3).reshape(C, -1)
    np.testing.assert_array_equal(f["frac_active"], (flat > 0).mean(1))
    sub = a.reshape(N, C, -1)[:, :, ::3].transpose(1, 0, 2).reshape(C, -1)
    assert stats["conv1"].hist_count == sub.shape[1]
    grid = LogGrid()
    per_channel = np.stack([np.bincount(b, minlength=grid.bins) for b in grid.bin_of(sub.astype(np.float32))])
    np.testing.assert_array_equal(stats["conv1"].hist.numpy(), per_channel)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("positions", [13, 400])  # few values per channel, and enough for sub-histograms
def test_kernel_equals_torch_ops_on_nan_inf_ties_and_signed_zeros(monkeypatch, stride, positions):
    g = LogGrid(bits=3, octaves=6)
    torch.manual_seed(0)
    x = torch.randn(2, 7, SUB, positions) * torch.exp(torch.randn(2, 7, SUB, positions) * 4)  # C == SUB: no confusion
    x[0, 0, 0] = 0.0  # all ties: the first position is the max
    x[0, 1, 1, [2, 9]] = 1e9  # a tied max
    x[1, 2, 2, 3], x[1, 3, 2, 5] = float("nan"), float("-inf")
    x[1, 4, 3, :4] = torch.tensor([-0.0, 0.0, float("inf"), 1e-30])
    x[1, 5, 1] = -1.0
    x[1, 5, 1, [3, 6]] = torch.tensor([-0.0, 0.0])  # max 0 with both signs: the first zero is the max
    y = torch.randint(0, 3, (2, 7))

    def run(fused: bool, threads: int):
        monkeypatch.setattr(stats_module, "FUSED_CPU", fused)
        torch.set_num_threads(threads)
        try:
            s, top = stats_module.LayerStats("x", g, 3, stride), TopK("x", 14)  # every image: every max compared
            for i in range(2):
                s.update(x[i, :, :, :, None], y[i], top, 7 * i)
            return s, top.state()
        finally:
            torch.set_num_threads(2)

    ref, ref_top = run(False, 2)
    for threads in (1, 2):  # the kernel does not depend on the number of threads
        got, got_top = run(True, threads)
        for f in ("hist", "min", "max", "active", "shift"):
            assert same(getattr(got, f), getattr(ref, f)), f
        for f, rtol in (("sum", 1e-9), ("class_sum", 1e-9), ("sumsq", 1e-5)):  # torch: float32 squares per row
            torch.testing.assert_close(getattr(got, f), getattr(ref, f), equal_nan=True, rtol=rtol, atol=0)
        assert (got.count, got.hist_count, got.images) == (ref.count, ref.hist_count, ref.images)
        np.testing.assert_allclose(got_top["value"], ref_top["value"], rtol=1e-6)
        for c in ("max_value", "argmax", "index"):
            np.testing.assert_array_equal(got_top[c], ref_top[c])
    # NaN propagates to min and max, and its image ranks first
    assert ref.min.isnan()[2] and ref.max.isnan()[2]
    assert ref_top["index"][2, 0] == 9 and np.isnan(ref_top["max_value"][2, 0]) and ref_top["argmax"][2, 0] == 3


def test_kernel_refuses_a_label_outside_the_classes():
    s, top = stats_module.LayerStats("x", LogGrid(), 3), TopK("x", 2)
    with pytest.raises(ValueError, match="label"):
        s.update(torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 3, 2]), top, 0)


def test_rank_key_orders_by_value_then_index():
    v = torch.tensor([1.0, -2.0, 0.0, -0.0, float("inf"), float("nan"), 1.0, -float("inf"), 3e-39, -3e-39])
    i = torch.arange(len(v))
    order = torch.argsort(rank_key(v, i), descending=True).tolist()
    # by brute force: values descending, NaN as +inf, -0.0 == 0.0, ties by lower index
    want = sorted(range(len(v)), key=lambda j: (-np.nan_to_num(v[j].item(), nan=np.inf, posinf=np.inf), j))
    assert order == want


def test_selectivity_guards_division():
    means = np.array([[0.0, 1.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # dead / one-hot / signed
    si = selectivity(means)
    assert np.isnan(si[0])
    assert si[1] == pytest.approx(1.0)
    top, rest = 1.0, -0.5
    assert si[2] == pytest.approx((top - rest) / (top + rest))
    assert np.isnan(selectivity(means[:1])).all()  # one class only


def test_cli_end_to_end_and_bad_layer(tmp_path):
    from probe.cli import main

    run_dir = tmp_path / "tiny"
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=1", f"run_dir={run_dir}",
                 f"hydra.run.dir={tmp_path / 'h'}"]) == 0
    assert main(["activations", f"run={run_dir}", "top_k=3", "data.limit=100"]) == 0
    out = run_dir / "activations"
    for f in ("stats.parquet", "class_means.parquet", "hist.parquet", "exemplars.parquet", "exemplar_crops.npz",
              "filters.npz", "feature_maps.npz", "metrics.json", "filters_conv1_signed_scaled.png",
              "filters_conv2_mean_over_input_channels.png", "feature_maps_conv1.png", "exemplars_conv1.png"):
        assert (out / f).is_file(), f
    stats = pd.read_parquet(out / "stats.parquet")
    assert set(stats.layer) == {"conv1", "pool", "conv2", "gap", "fc"}
    assert (stats["count"][stats.layer == "fc"] == 100).all()  # linear units: one position per image
    ex = pd.read_parquet(out / "exemplars.parquet")
    assert len(ex) == 3 * len(stats) and ex.groupby(["layer", "channel"]).size().eq(3).all()
    assert ex["index"].between(0, 99).all()
    with np.load(out / "exemplar_crops.npz") as z:
        assert z["conv1/crops"].shape[:2] == (4, 3)
    # a bad layer name: exit code 2, the closest valid name in the message
    err = StringIO()
    with redirect_stderr(err):
        code = main(["activations", f"run={run_dir}", "layers=[conv_2]"])
    assert code == 2
    assert "conv_2" in err.getvalue() and "did you mean 'conv2'" in err.getvalue()
    assert (out / "stats.parquet").is_file()  # the earlier output is untouched


NO_CACHE_FOLDER = """
import json, numba, pytest, torch
import numba.core.caching as caching
caching.CacheImpl._locator_classes = []  # what numba sees when no cache folder is writable
with pytest.raises(RuntimeError, match="no locator"):
    numba.njit(cache=True)(lambda: 0)
from probe.activations import LogGrid, TopK, stats
torch.manual_seed(0)
s = stats.LayerStats("x", LogGrid(), 3)
s.update(torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2]), TopK("x", 2), 0)
print(json.dumps({"fused": stats.FUSED_CPU, "sum": s.sum.tolist(), "max": s.max.tolist()}))
"""


def test_kernel_compiles_in_memory_where_numba_has_no_writable_cache_folder(tmp_path):
    """A read-only install without a home: numba finds no cache locator, and the import still works."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", NO_CACHE_FOLDER], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    assert got["fused"]
    np.testing.assert_allclose(got["sum"], x.double().sum((0, 2, 3)).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(got["max"], x.amax((0, 2, 3)).numpy())
