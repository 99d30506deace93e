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
    stats = collect(model, batches(x, y, size), LAYERS, torch.device("cpu"), K_CLASSES, grid or LogGrid(),
                    top_k=k, hist_stride=stride, start=start)
    return stats, stats.exemplars


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
    whole = collect(model, [b for _, bs in shards for b in bs], LAYERS, cpu, K_CLASSES, top_k=3, hist_stride=stride)
    whole_top = whole.exemplars
    parts = [collect(model, bs, LAYERS, cpu, K_CLASSES, top_k=3, hist_stride=stride, start=lo) for lo, bs in shards]
    # shard 0 goes through a save / load round trip, as a sharded run would (exemplars in the same file)
    parts[0].save(tmp_path / "shard0.npz")
    merged = PopulationStats.load(tmp_path / "shard0.npz")
    assert list(merged.layers) == list(LAYERS) and list(merged.exemplars) == list(LAYERS)
    for stats in parts[1:][::-1]:  # any order
        merged.merge(stats)
    tops = merged.exemplars
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
    means = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])  # dead / one-hot / graded
    si = selectivity(means)
    assert np.isnan(si[0])
    assert si[1] == pytest.approx(1.0)
    top, rest = 1.0, 0.25
    assert si[2] == pytest.approx((top - rest) / (top + rest))
    assert np.isnan(selectivity(means[:1])).all()  # one class only


# -- rectified responses: where dead units and class selectivity are defined ---------------------
def brute_selectivity(r: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Morcos et al. (2018) section 2.3 by hand, float64: per class the mean over images of the map-averaged
    response, then (max - mean of the other classes) / (max + mean of the others)."""
    per_image = r.reshape(len(r), r.shape[1], -1).mean(2)
    mu = np.stack([per_image[labels == k].mean(0) for k in range(classes)])
    top = mu.max(0)
    rest = (mu.sum(0) - top) / (classes - 1)
    with np.errstate(invalid="ignore"):  # a dead unit: 0 / 0, undefined
        return (top - rest) / (top + rest)


def test_selectivity_of_a_hand_made_population(reduction, tmp_path):
    """One unit that fires for one class only -> 1; the same response for every class -> 0; signed pre-ReLU
    units get the index of their rectified values (brute force in float64), through a BN too; merged shards
    and a save / load round trip give the same."""
    from probe.activations.rectified import Rectified

    K, N, C, P = 3, 60, 4, 5
    rng = np.random.default_rng(0)
    labels = np.arange(N) % K
    x = rng.standard_normal((N, C, P)).astype(np.float32)
    x[:, 0] = np.where(labels[:, None] == 1, np.abs(x[:, 0]) + 0.5, -np.abs(x[:, 0]) - 0.1)  # fires for class 1 only
    x[:, 1] = np.abs(rng.standard_normal(P)).astype(np.float32) + 0.2  # the same map for every image
    x[:, 3] += 0.8 * labels[:, None]  # signed, graded by class
    bn = Rectified("bn+relu", scale=np.array([1.0, -2.0, 0.5, -1.5]), center=np.array([0.0, 0.3, -0.2, 1.0]),
                   offset=np.array([0.0, 1.0, 0.1, 0.4]), via="bn")
    xt, yt = torch.from_numpy(x[:, :, :, None]), torch.from_numpy(labels).long()

    def stats_of(rect, parts):
        out = []
        for lo, hi in parts:
            s = stats_module.LayerStats("u", LogGrid(), K, rectified=rect)
            s.update(xt[lo:hi], yt[lo:hi], TopK("u", 2), lo)
            out.append(s)
        return out

    x64 = x.astype(np.float64)
    for rect, r in ((Rectified("relu"), np.maximum(x64, 0)),
                    (bn, np.maximum(bn.scale[None, :, None] * (x64 - bn.center[None, :, None]) + bn.offset[None, :, None], 0))):
        want = brute_selectivity(r, labels, K)
        if rect.kind == "relu":
            assert want[0] == 1.0 and abs(want[1]) < 1e-15  # the known answers, by hand
            raw = brute_selectivity(x64, labels, K)
            assert not 0 <= raw[0] <= 1  # what the signed values would have given (about 5)
        (whole,) = stats_of(rect, [(0, N)])
        np.testing.assert_allclose(whole.to_frame()["selectivity"], want, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(whole.to_frame()["frac_active_rectified"], (r > 0).mean((0, 2)))
        # shards merged in another order, one of them through its saved state
        a, b, c = stats_of(rect, [(0, 17), (17, 40), (40, N)])
        PopulationStats({"u": b}).save(tmp_path / "b.npz")
        merged = PopulationStats.load(tmp_path / "b.npz")["u"].merge(c).merge(a)
        assert merged.rectified.same(rect)
        np.testing.assert_allclose(merged.to_frame()["selectivity"], want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(merged.class_rect, whole.class_rect, rtol=1e-12, atol=1e-12)
        assert torch.equal(merged.active_rect, whole.active_rect)
        np.testing.assert_array_equal(merged.to_frame()["dead"].to_numpy(bool), ~(r > 0).any((0, 2)))
    with pytest.raises(ValueError, match="rectified responses"):
        stats_of(Rectified("relu"), [(0, 10)])[0].merge(stats_of(bn, [(10, 20)])[0])
    with pytest.raises(ValueError, match="rectified responses"):
        stats_of(None, [(0, 10)])[0].merge(stats_of(bn, [(10, 20)])[0])


@pytest.mark.parametrize("positions", [13, 400])
def test_kernel_equals_torch_ops_on_the_rectified_response(monkeypatch, positions):
    """Class sums and active counts of clamp(a (x - m) + b, 0, cap): kernel (float64, any thread count)
    against the torch ops (float32 affine), with NaN, inf, a negative and a zero scale, and a ReLU6 cap."""
    from probe.activations.rectified import Rectified

    torch.manual_seed(0)
    C = 5
    x = torch.randn(2, 6, C, positions) * torch.exp(torch.randn(2, 6, C, positions) * 3)
    x[1, 2, 2, 3], x[1, 3, 1, 5], x[0, 1, 4, 0] = float("nan"), float("inf"), float("-inf")
    y = torch.randint(0, 3, (2, 6))
    rects = [Rectified("relu"), Rectified("relu6", cap=6.0),
             Rectified("bn+relu6", np.array([2.0, -0.5, 0.0, 1.0, -3.0]), np.array([0.3, -1.0, 0.0, 0.5, 2.0]),
                       np.array([-0.1, 0.2, 0.7, 0.0, -1.0]), cap=6.0, via="bn")]

    def run(fused: bool, threads: int, rect):
        monkeypatch.setattr(stats_module, "FUSED_CPU", fused)
        torch.set_num_threads(threads)
        try:
            s = stats_module.LayerStats("x", LogGrid(), 3, rectified=rect)
            top = TopK("x", 3)
            for i in range(2):
                s.update(x[i, :, :, :, None], y[i], top, 6 * i)
            return s
        finally:
            torch.set_num_threads(2)

    for rect in rects:
        ref = run(False, 2, rect)
        # brute force, float64: the class sums of the rectified response
        r = rect.apply(x.reshape(12, C, positions)).numpy()
        yy = y.reshape(-1).numpy()
        with np.errstate(invalid="ignore"):
            want = np.stack([r[yy == k].sum((0, 2)) for k in range(3)])
        np.testing.assert_allclose(ref.class_rect.numpy(), want, rtol=1e-5, equal_nan=True)
        for threads in (1, 2):
            got = run(True, threads, rect)
            torch.testing.assert_close(got.class_rect, ref.class_rect, equal_nan=True,
                                       rtol=1e-12 if rect.scale is None else 1e-6, atol=0)
            torch.testing.assert_close(got.class_rect.numpy(), want, equal_nan=True, rtol=1e-12, atol=0)
            assert torch.equal(got.active_rect, ref.active_rect)
            np.testing.assert_array_equal(got.active_rect.numpy(), (r > 0).sum((0, 2)))
        assert ref.class_rect.isnan().any()  # the NaN reached its class (with a cap, the infs are capped at 6)


def _rect(model, layers, x):
    from probe.activations.rectified import rectified_responses

    return rectified_responses(model.eval(), x, layers)


class _Seq(nn.Module):
    def __init__(self, *mods, fn=None):
        super().__init__()
        self.body = nn.Sequential(*mods)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.body(x)) if self.fn else self.body(x)


def test_rectified_response_is_found_on_hand_built_nets():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8)
    conv = lambda: nn.Conv2d(2, 2, 3, padding=1)  # noqa: E731
    kinds = lambda r: {k: (v.kind if v else None) for k, v in r.items()}  # noqa: E731
    assert kinds(_rect(_Seq(conv(), nn.ReLU()), ["body.0", "body.1"], x)) == {"body.0": "relu", "body.1": "self"}
    assert kinds(_rect(_Seq(conv(), fn=F.relu), ["body.0"], x)) == {"body.0": "relu"}
    assert kinds(_rect(_Seq(conv(), nn.ReLU(inplace=True)), ["body.0"], x)) == {"body.0": "relu"}
    assert kinds(_rect(_Seq(conv(), fn=torch.relu_), ["body.0"], x)) == {"body.0": "relu"}
    six = _rect(_Seq(conv(), nn.ReLU6()), ["body.0"], x)["body.0"]
    assert (six.kind, six.cap) == ("relu6", 6.0)
    # pooling after a ReLU, linear logits, a leaky ReLU, a PReLU: none
    net = _Seq(conv(), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    assert kinds(_rect(net, ["body.0", "body.2", "body.4"], x)) == {"body.0": "relu", "body.2": None, "body.4": None}
    assert kinds(_rect(_Seq(conv(), nn.LeakyReLU()), ["body.0"], x)) == {"body.0": None}
    assert kinds(_rect(_Seq(conv(), nn.PReLU()), ["body.0"], x)) == {"body.0": None}
    # conv -> BN -> ReLU: the BN's affine map, checked against the BN module itself
    bn_net = _Seq(conv(), nn.BatchNorm2d(2), nn.ReLU(inplace=True))
    with torch.no_grad():
        bn_net.body[1].running_mean.copy_(torch.tensor([0.5, -0.3]))
        bn_net.body[1].running_var.copy_(torch.tensor([2.0, 0.3]))
        bn_net.body[1].weight.copy_(torch.tensor([-1.2, 0.8]))
        bn_net.body[1].bias.copy_(torch.tensor([0.1, -0.2]))
    r = _rect(bn_net, ["body.0", "body.1"], x)
    assert (r["body.0"].kind, r["body.0"].via, r["body.1"].kind) == ("bn+relu", "body.1", "relu")
    with torch.no_grad():
        c = bn_net.body[0](torch.randn(4, 2, 8, 8))
        torch.testing.assert_close(r["body.0"].apply(c), torch.relu(bn_net.body[1](c)).double(), rtol=1e-5, atol=1e-6)
    bn_net.train()  # batch statistics: not a fixed per-channel map
    from probe.activations.rectified import rectified_responses

    assert rectified_responses(bn_net, torch.randn(2, 2, 8, 8), ["body.0"])["body.0"] is None

    class Residual(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.conv, self.bn, self.relu, self.inplace = conv(), nn.BatchNorm2d(2), nn.ReLU(), inplace

        def forward(self, x):
            out = self.bn(self.conv(x))
            if self.inplace:
                out += x
            else:
                out = out + x
            return self.relu(out)

    for inplace in (False, True):  # conv -> bn -> (+ shortcut) -> relu: none, in place or not
        assert kinds(_rect(Residual(inplace), ["conv", "bn", "relu", ""], x)) == {
            "conv": None, "bn": None, "relu": "self", "": "self"}


def test_rectified_response_of_torchvision_resnet18():
    import torchvision

    m = torchvision.models.resnet18(num_classes=10).eval()  # in-place ReLUs, one ReLU module reused per block
    names = ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.bn2", "layer1.0",
             "layer2.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2", "layer4.1.relu", "avgpool", "fc"]
    r = _rect(m, names, torch.randn(1, 3, 64, 64))
    assert r["conv1"].sites == r["bn1"].sites == r["relu"].sites and len(r["conv1"].sites) == 1  # the same units
    assert len(r["layer4.1.relu"].sites) == 2 and r["layer4.1.conv1"].sites[0] in r["layer4.1.relu"].sites
    got = {n: (v.kind, v.via) if v else None for n, v in r.items()}
    assert got == {"conv1": ("bn+relu", "bn1"), "bn1": ("relu", None), "relu": ("self", None), "maxpool": None,
                   "layer1.0.conv1": ("bn+relu", "layer1.0.bn1"), "layer1.0.conv2": None, "layer1.0.bn2": None,
                   "layer1.0": ("self", None), "layer2.0.downsample.0": None,
                   "layer4.1.conv1": ("bn+relu", "layer4.1.bn1"), "layer4.1.conv2": None,
                   "layer4.1.relu": ("self", None), "avgpool": None, "fc": None}
    # the affine map is the BN's: relu(bn1(conv1(x))) with trained-looking BN statistics, by the modules themselves
    bn = m.bn1
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.1, 3), bn.weight.normal_(), bn.bias.normal_()
        c = m.conv1(torch.randn(2, 3, 32, 32))
        want = torch.relu(bn(c)).double()
    r = _rect(m, ["conv1"], torch.randn(1, 3, 64, 64))["conv1"]
    torch.testing.assert_close(r.apply(c), want, rtol=1e-5, atol=1e-5)


def test_metrics_cover_only_layers_with_a_rectified_response(setup):
    """metrics.json: dead units per rectified layer by brute force, pooled over those layers only."""
    from probe.pipeline.activations.stage import metrics
    from probe.uncertainty import proportion_interval

    model, x, y, acts = setup
    stats, _ = run(model, x, y)
    m = metrics(stats, LAYERS)
    rectified = model.brute_rectified(acts)
    layers = [n for n in LAYERS if rectified[n] is not None]
    assert layers == ["conv1", "conv2", "bn"]
    dead = {n: int((~(rectified[n] > 0).any((0, 2, 3))).sum()) for n in layers}
    units = {n: rectified[n].shape[1] for n in layers}
    assert m["dead_units"] == {n: {"dead": dead[n], "units": units[n]} for n in layers}
    assert m["dead_fraction"] == {n: dead[n] / units[n] for n in layers}
    assert dead["conv2"] == dead["bn"] == 1  # the BN's beta = -100 channel, seen from the conv and from the BN
    # conv2 -> bn -> relu and bn -> relu are the same units: the pooled figures count them once
    assert m["dead_fraction_layers"] == ["conv1", "conv2"]
    k, n = dead["conv1"] + dead["conv2"], units["conv1"] + units["conv2"]
    assert m["dead_fraction_mean"] == k / n
    assert m["dead_fraction_interval"] == proportion_interval(k, n).to_dict()
    assert m["dead_fraction_interval"]["low"] <= k / n <= m["dead_fraction_interval"]["high"]
    assert set(m["selectivity_median"]) == set(layers)
    yn = y.numpy()
    for name in layers:
        si = brute_selectivity(rectified[name], yn, K_CLASSES)
        assert m["selectivity_median"][name] == pytest.approx(np.nanmedian(si), rel=1e-4)
        assert m["sparsity_rectified"][name] == pytest.approx(1 - (rectified[name] > 0).mean(), abs=1e-12)
    assert set(m["sparsity"]) == set(LAYERS)
    for name in LAYERS:
        assert m["sparsity"][name] == pytest.approx(1 - (acts[name] > 0).mean(), abs=1e-12)
    json.dumps(m, allow_nan=False)  # numbers and nulls only


def test_cli_end_to_end_and_bad_layer(tmp_path):
    from probe.pipeline.cli import main

    run_dir = tmp_path / "tiny"
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=1", f"run_dir={run_dir}",
                 f"hydra.run.dir={tmp_path / 'h'}"]) == 0
    assert main(["activations", f"run={run_dir}", "activations.top_k=3", "data.limit=100"]) == 0
    out = run_dir / "activations"
    for f in ("stats.parquet", "class_means.parquet", "hist.parquet", "exemplars.parquet", "exemplar_crops.npz",
              "filters.npz", "feature_maps.npz", "metrics.json", "filters_conv1_signed_scaled.png",
              "filters_conv2_mean_over_input_channels.png", "feature_maps_conv1.png", "exemplars_conv1.png"):
        assert (out / f).is_file(), f
    stats = pd.read_parquet(out / "stats.parquet")
    assert set(stats.layer) == {"conv1", "pool", "conv2", "gap", "fc"}
    assert (stats["count"][stats.layer == "fc"] == 100).all()  # linear units: one position per image
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dead_fraction_layers"] == ["conv1", "conv2"]  # conv -> relu; not the pools or the logits
    kinds = {n: (None if pd.isna(v) else v) for n, v in stats.drop_duplicates("layer").set_index("layer")["rectified"].items()}
    assert kinds == {"conv1": "relu", "pool": None, "conv2": "relu", "gap": None, "fc": None}
    assert stats["selectivity"].dropna().between(0, 1).all()
    ex = pd.read_parquet(out / "exemplars.parquet")
    assert len(ex) == 3 * len(stats) and ex.groupby(["layer", "channel"]).size().eq(3).all()
    assert ex["index"].between(0, 99).all()
    with np.load(out / "exemplar_crops.npz") as z:
        assert z["conv1/crops"].shape[:2] == (4, 3)
    # a bad layer name: exit code 2, the closest valid name in the message
    err = StringIO()
    with redirect_stderr(err):
        code = main(["activations", f"run={run_dir}", "activations.layers=[conv_2]"])
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
