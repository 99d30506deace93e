"""ROAD (probe/saliency/road.py) and Efficient MPRT (probe/saliency/mprt.py) against closed forms, a model
whose evidence is known, and Quantus 0.6's implementations (quantus.functions.perturb_func.
noisy_linear_imputation, quantus.ROAD, quantus.EfficientMPRT) on a small shared case."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from probe.errors import ConfigError
from probe.pipeline.saliency.config import SaliencyConfig
from probe.saliency.mprt import efficient_mprt, explanation_complexity, fully_randomised, mprt_summary, mprt_table
from probe.saliency.road import (NEIGHBOUR_WEIGHTS, noisy_linear_imputation, removal_masks, removal_order, road_auc,
                                 road_curves, road_summary, road_table)
from probe.uncertainty import paired_comparison


def quantus():
    q = pytest.importorskip("quantus", reason="Quantus is a test dependency: pip install -e '.[test]'")
    warnings.filterwarnings("ignore", module="quantus")
    return q


def tiny_model(seed: int = 0, channels: int = 1, side: int = 12, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * side * side, classes)).eval()


# ---------------------------------------------------------------- noisy linear imputation: closed forms

def neighbour_average(img: np.ndarray, r: int, c: int) -> float:
    """The reference weights' average over the in-image neighbours of (r, c), computed by hand."""
    num = den = 0.0
    for (dy, dx), wt in NEIGHBOUR_WEIGHTS:
        y, x = r + dy, c + dx
        if 0 <= y < img.shape[0] and 0 <= x < img.shape[1]:
            num, den = num + wt * img[y, x], den + wt
    return num / den


def test_imputed_pixel_is_the_neighbour_average():
    img = np.arange(25, dtype=np.float64).reshape(5, 5) ** 1.5  # not linear, so the average is not trivial
    x = img[None, None]
    for r, c in [(2, 2), (0, 0), (0, 2), (4, 3)]:
        removed = np.zeros((1, 5, 5), bool)
        removed[0, r, c] = True
        out = noisy_linear_imputation(x, removed, noise_std=0.0)
        # interior: (4 direct / 6 + 4 diagonal / 12); corner: (2/6 + 1/12) renormalised by 5/12
        assert out[0, 0, r, c] == pytest.approx(neighbour_average(img, r, c), rel=1e-12)
        keep = ~removed[0]
        assert np.array_equal(out[0, 0][keep], img[keep])  # the kept pixels are untouched
    # interior pixel written out: (x[1,2] + x[3,2] + x[2,1] + x[2,3]) / 6 + (four diagonals) / 12
    direct = img[1, 2] + img[3, 2] + img[2, 1] + img[2, 3]
    diagonal = img[1, 1] + img[1, 3] + img[3, 1] + img[3, 3]
    removed = np.zeros((1, 5, 5), bool)
    removed[0, 2, 2] = True
    assert noisy_linear_imputation(x, removed, 0.0)[0, 0, 2, 2] == pytest.approx(direct / 6 + diagonal / 12, rel=1e-12)


def test_two_adjacent_removed_pixels_solve_their_2x2_system():
    img = np.random.default_rng(1).random((6, 6))
    removed = np.zeros((1, 6, 6), bool)
    removed[0, 2, 2] = removed[0, 2, 3] = True
    # a = S_a + b / 6 and b = S_b + a / 6, with S the weighted sum over the kept neighbours (interior: weights sum to 1)
    s_a = sum(wt * img[2 + dy, 2 + dx] for (dy, dx), wt in NEIGHBOUR_WEIGHTS if (dy, dx) != (0, 1))
    s_b = sum(wt * img[2 + dy, 3 + dx] for (dy, dx), wt in NEIGHBOUR_WEIGHTS if (dy, dx) != (0, -1))
    a = (s_a + s_b / 6) / (1 - 1 / 36)
    b = (s_b + s_a / 6) / (1 - 1 / 36)
    out = noisy_linear_imputation(img[None, None], removed, 0.0)[0, 0]
    assert out[2, 2] == pytest.approx(a, rel=1e-12) and out[2, 3] == pytest.approx(b, rel=1e-12)


def test_channels_are_imputed_independently_and_affine_maps_commute():
    rng = np.random.default_rng(2)
    x = rng.random((3, 3, 9, 9))
    removed = rng.random((3, 9, 9)) < 0.6
    out = noisy_linear_imputation(x, removed, 0.0)
    for ch in range(3):
        assert np.allclose(out[:, ch:ch + 1], noisy_linear_imputation(x[:, ch:ch + 1], removed, 0.0), atol=1e-13)
    # weights sum to one: imputing (x - m) / s equals (imputed x - m) / s (why the stage imputes normalised inputs)
    m, s = np.array([0.1, 0.5, -0.2]).reshape(1, 3, 1, 1), np.array([0.3, 2.0, 0.7]).reshape(1, 3, 1, 1)
    assert np.allclose(noisy_linear_imputation((x - m) / s, removed, 0.0), (out - m) / s, atol=1e-12)


def test_noise_has_the_requested_std_on_removed_pixels_only():
    rng = np.random.default_rng(3)
    x = rng.random((8, 2, 16, 16))
    removed = rng.random((8, 16, 16)) < 0.5
    clean = noisy_linear_imputation(x, removed, 0.0)
    noisy = noisy_linear_imputation(x, removed, [0.05, 0.2], np.random.default_rng(4))
    d = noisy - clean
    for ch, sigma in enumerate([0.05, 0.2]):
        inside = d[:, ch][removed]
        assert np.all(d[:, ch][~removed] == 0)
        # about 1000 draws: the sample std is within 10% of sigma with overwhelming probability
        assert inside.std() == pytest.approx(sigma, rel=0.1) and abs(inside.mean()) < 4 * sigma / math.sqrt(len(inside))


@pytest.mark.parametrize("channels,width", [(1, 12), (3, 12), (2, 70)])  # width 70 takes the SuperLU path
def test_imputation_matches_quantus(channels, width):
    q = quantus()
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation

    rng = np.random.default_rng(channels)
    x = rng.random((3, channels, 9, width))
    idx = removal_order(rng.random((3, 9, width)), "morf", seed=0)
    for k in (1, 30, 9 * width - 1):
        mine = noisy_linear_imputation(x, removal_masks(idx, k, 9, width), 0.0)
        for n in range(3):
            theirs = quantus_imputation(x[n].copy(), idx[n, :k], noise=0.0)
            np.testing.assert_allclose(mine[n], theirs, atol=1e-10, rtol=0)  # both float64 direct solves
    assert q.__version__


# ---------------------------------------------------------------- orders, AUC, curves

def test_removal_order_and_ties():
    maps = np.array([[[0.3, 0.9], [0.1, 0.5]]])
    assert removal_order(maps, "morf", 0).tolist() == [[1, 3, 0, 2]]
    assert removal_order(maps, "lerf", 0).tolist() == [[2, 0, 3, 1]]
    flat = np.zeros((1, 4, 4))  # all tied: a seeded random permutation, not raster order
    orders = {tuple(removal_order(flat, "morf", s)[0]) for s in range(5)}
    assert len(orders) > 1 and all(sorted(o) == list(range(16)) for o in orders)
    assert tuple(removal_order(flat, "morf", 3)[0]) == tuple(removal_order(flat, "morf", 3)[0])


def test_auc_is_the_mean_height_over_the_fractions():
    f = [0.1, 0.3, 0.5, 0.9]
    curves = np.array([[0.4, 0.4, 0.4, 0.4], [0.1, 0.3, 0.5, 0.9], [1.0, 0.0, 0.0, 0.0]])
    # constant -> itself; the identity line -> its mean over [0.1, 0.9] = 0.5; a drop -> 0.5 * 0.2 / 0.8
    np.testing.assert_allclose(road_auc(curves, f), [0.4, 0.5, 0.125], atol=1e-15)
    assert road_auc(np.array([[0.7]]), [0.5]).tolist() == [0.7]


def test_bad_arguments_are_named():
    model, x = tiny_model(), torch.rand(2, 1, 12, 12)
    t, maps = torch.zeros(2, dtype=torch.long), torch.rand(2, 12, 12)
    with pytest.raises(ValueError, match=r"fractions.*\[0, 1\)"):
        road_curves(model, x, t, maps, [0.5, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        road_curves(model, x, t, maps, [0.5, 0.2])
    with pytest.raises(ValueError, match="order: 'best'"):
        road_curves(model, x, t, maps, [0.5], order="best")
    with pytest.raises(ValueError, match="maps: expected shape"):
        road_curves(model, x, t, maps[:, :6], [0.5])
    with pytest.raises(ValueError, match="every pixel removed"):
        noisy_linear_imputation(np.zeros((1, 1, 3, 3)), np.ones((1, 3, 3), bool), 0.0)
    for bad in ({"road_fractions": []}, {"road_fractions": [0.5, 1.0]}, {"road_fractions": [0.4, 0.2]},
                {"road_noise": -0.1}):
        with pytest.raises(ConfigError, match="saliency.road_"):
            SaliencyConfig(**bad)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_accuracy_curve_matches_quantus(order):
    q = quantus()
    side = 12
    torch.manual_seed(5)
    # a linear read-out whose argmax moves as pixels are imputed (a conv net at init predicts one class)
    model = nn.Sequential(nn.Flatten(), nn.Linear(side * side, 4)).eval()
    with torch.no_grad():
        model[1].weight.mul_(20)
    x = torch.rand(16, 1, side, side)
    y = model(x).argmax(1)
    maps = torch.rand(16, side, side)  # no ties, so both orders are the same permutation
    pct = list(range(10, 100, 10))
    # Quantus's ROAD removes most relevant first only; least relevant first is most relevant of the reversed map
    # (1 - map: Quantus rejects all-negative maps)
    a = maps.numpy() if order == "morf" else 1 - maps.numpy()
    metric = q.ROAD(percentages=pct, noise=0.0, normalise=False, abs=False, disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None], device="cpu")
    mine = road_curves(model, x, y, maps, [p / 100 for p in pct], order, noise_std=0.0, score="accuracy").mean(0)
    assert len(set(theirs.values())) > 2  # the curve moves: the comparison can fail
    np.testing.assert_allclose(mine.numpy(), [theirs[p] for p in pct], atol=1e-12, rtol=0)


class Evidence(nn.Module):
    """Two classes; logit of class 1 = scale * (sum_p e_p x_p - bias): pixel p's evidence is e_p x_p, exactly."""

    def __init__(self, e: torch.Tensor, bias: float, scale: float):
        super().__init__()
        self.e, self.bias, self.scale = e, bias, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * ((x[:, 0] * self.e).flatten(1).sum(1) - self.bias)
        return torch.stack([torch.zeros_like(z), z], 1)


def evidence_case(side: int = 12, n: int = 16):
    g = torch.Generator().manual_seed(0)
    e = torch.empty(side, side).exponential_(generator=g)
    x = torch.rand(n, 1, side, side, generator=g)  # iid pixels: the neighbours do not predict a pixel's evidence
    bias = float((x[:, 0] * e).flatten(1).sum(1).mean())
    return Evidence(e, bias, 4.0 / side), x, torch.ones(n, dtype=torch.long), x[:, 0] * e


def test_the_evidence_map_has_lerf_above_morf():
    model, x, t, evidence = evidence_case()
    f = [0.1 * i for i in range(1, 10)]
    morf = road_auc(road_curves(model, x, t, evidence, f, "morf", 0.01, seed=1), f)
    lerf = road_auc(road_curves(model, x, t, evidence, f, "lerf", 0.01, seed=2), f)
    c = paired_comparison(lerf, morf)
    assert c.effect > 0.5 and c.p < 0.01 and c.low > 0
    # random maps: MoRF and LeRF are the same game in distribution, so most seeds are not distinguishable
    hits = 0
    for s in range(10):
        rand = torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(100 + s))
        c = paired_comparison(road_auc(road_curves(model, x, t, rand, f, "lerf", 0.01, seed=s), f),
                              road_auc(road_curves(model, x, t, rand, f, "morf", 0.01, seed=s + 50), f))
        hits += c.distinguishable()
    assert hits <= 3


def test_road_table_and_summary_use_the_true_rows():
    model, x, t, evidence = evidence_case(side=8, n=6)
    kind = ["true"] * 4 + ["predicted"] * 2
    f = [0.2, 0.5, 0.8]
    table = road_table(model, x, t, {"evidence": evidence, "flat": torch.zeros_like(evidence)}, image=[0, 1, 2, 3, 1, 2],
                       target_kind=kind, fractions=f, noise_std=0.01, seed=0, batch_size=5)
    assert list(table.columns[:4]) == ["method", "item", "image", "target_kind"] and len(table) == 12
    row = table.iloc[0]
    assert len(row.road_morf_curve) == 3 and row.road_morf_auc == pytest.approx(road_auc(np.array([row.road_morf_curve]), f)[0])
    s = road_summary(table)
    true = table[(table.method == "evidence") & (table.target_kind == "true")]
    assert s["evidence"]["road_morf_auc"] == pytest.approx(true.road_morf_auc.mean())
    c = s["evidence"]["road_lerf_vs_morf"]
    assert c["n"] == 4 and c["effect"] == pytest.approx((true.road_lerf_auc - true.road_morf_auc).mean())
    assert c["p_adjusted"] is not None and c["p_adjusted"] >= c["p"]  # Holm over the two methods
    # the same seed for both methods: the curves of one map do not depend on which other maps are in the table
    alone = road_table(model, x, t, {"evidence": evidence}, [0, 1, 2, 3, 1, 2], kind, f, 0.01, 0, 512)
    np.testing.assert_allclose(np.stack(alone.road_lerf_curve), np.stack(table[table.method == "evidence"].road_lerf_curve))


# ---------------------------------------------------------------- Efficient MPRT

def test_complexity_closed_forms():
    one_per_bin = np.arange(100.0).reshape(1, 10, 10)  # 100 equal-width bins, one value each: log 100
    two_values = np.array([[[0.0, 1.0], [1.0, 0.0]]])  # half in the first bin, half in the last: log 2
    constant = np.full((1, 4, 4), 3.0)  # one bin: 0
    np.testing.assert_allclose(explanation_complexity(one_per_bin), [math.log(100)], rtol=1e-12)
    np.testing.assert_allclose(explanation_complexity(two_values), [math.log(2)], rtol=1e-12)
    assert explanation_complexity(constant).tolist() == [0.0]
    # a quarter of the values in one bin, three quarters in another
    q = np.array([[[0.0, 1.0, 1.0, 1.0]]])
    np.testing.assert_allclose(explanation_complexity(q), [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], rtol=1e-12)


def test_emprt_of_a_constant_map_and_of_a_map_that_does_not_change():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 8, 8))
    same = efficient_mprt(maps, maps.copy())
    assert np.all(same.rise == 0) and np.array_equal(same.complexity_original, same.complexity_randomised)
    constant = efficient_mprt(np.ones((3, 8, 8)), rng.random((3, 8, 8)))
    assert np.all(constant.complexity_original == 0) and np.isnan(constant.rise).all()
    assert np.all(constant.complexity_randomised > 0)
    # through the table and the summary: no change gives effect 0 and p = 1
    model = tiny_model(side=8)
    x = torch.rand(5, 1, 8, 8)
    table = mprt_table(model, x, {"fixed": torch.from_numpy(maps)}, lambda m, rm: torch.from_numpy(maps),
                       image=range(5), target_kind=["true"] * 5, seed=0)
    c = mprt_summary(table)["fixed"]["emprt_complexity_rise"]
    assert c["effect"] == 0 and c["p"] == 1 and not c["distinguishable"]
    assert mprt_summary(table)["fixed"]["emprt"] == 0


def test_emprt_matches_quantus():
    q = quantus()
    model = tiny_model(side=12)
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    calls = []

    def input_x_gradient(model, inputs, targets, **_):
        xi = torch.as_tensor(inputs).float().requires_grad_(True)
        model(xi).gather(1, torch.as_tensor(targets).long().view(-1, 1)).sum().backward()
        a = (xi.grad * xi).detach().numpy()
        calls.append(a.copy())
        return a

    a0 = input_x_gradient(model, x.numpy(), y.numpy())
    calls.clear()
    metric = q.EfficientMPRT(disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a0,
                               explain_func=input_x_gradient, device="cpu"))
    # Quantus explains the original model first and the fully randomised one last
    assert np.allclose(calls[0], a0) and not np.allclose(calls[-1], a0)
    mine = efficient_mprt(calls[0][:, 0], calls[-1][:, 0])
    np.testing.assert_allclose(mine.rise, theirs, atol=1e-12, rtol=0)


def test_fully_randomised_changes_every_layer_and_keeps_the_original():
    model = tiny_model(side=12)
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    r = fully_randomised(model, x, seed=0)
    for (name, p0), (_, p1) in zip(model.named_parameters(), r.named_parameters()):
        assert not torch.equal(p0, p1), name
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model(side=12).parameters()))  # original kept


@pytest.fixture
def lerf_morf_frame():
    return pd.DataFrame({"method": ["a"] * 3, "item": [0, 1, 2], "target_kind": ["true", "true", "predicted"],
                         "road_morf_auc": [0.1, 0.2, 0.9], "road_lerf_auc": [0.5, 0.6, 0.0]})


def test_summary_ignores_predicted_rows(lerf_morf_frame):
    s = road_summary(lerf_morf_frame)["a"]
    assert s["road_morf_auc"] == pytest.approx(0.15) and s["road_lerf_vs_morf"]["effect"] == pytest.approx(0.4)
    assert s["road_lerf_vs_morf"]["n"] == 2


# ---------------------------------------------------------------- the saliency stage writes both

def run_stage(src, dst, **kw):
    import shutil

    from probe.pipeline.saliency.config import SaliencyStage
    from probe.pipeline.saliency.stage import run

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("saliency", "logs"))
    cfg = SaliencyConfig(methods=["saliency", "grad_cam"], ig_steps=4, smoothgrad_samples=2, auc_steps=4,
                         random_orders=2, randomisation=False, overlays=False, road_fractions=[0.2, 0.5, 0.8], **kw)
    return run(SaliencyStage(run=str(dst), device="cpu", saliency=cfg))


@pytest.mark.slow
def test_stage_writes_road_and_emprt_with_their_statistics(tiny_run, tmp_path):
    import json

    from scipy import stats

    out = run_stage(tiny_run, tmp_path / "a")
    road, emprt = pd.read_parquet(out / "road.parquet"), pd.read_parquet(out / "mprt.parquet")
    metrics = pd.read_parquet(out / "metrics.parquet")
    summary = json.loads((out / "metrics.json").read_text())
    assert set(road.method) == set(emprt.method) == {"saliency", "grad_cam"}
    merged = metrics.merge(road, on=["method", "item"], suffixes=("", "_road"))
    np.testing.assert_array_equal(merged.road_morf_auc, merged.road_morf_auc_road)  # one number, two tables
    for m in ("saliency", "grad_cam"):
        s = summary[m]
        g = road[(road.method == m) & (road.target_kind == "true")]
        d = (g.road_lerf_auc - g.road_morf_auc).to_numpy()  # recomputed from the per-row table with scipy's t
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        c = s["road_lerf_vs_morf"]
        assert c["effect"] == pytest.approx(d.mean(), abs=1e-12) and c["low"] == pytest.approx(d.mean() - half, abs=1e-12)
        assert s["road_morf_auc"] == pytest.approx(g.road_morf_auc.mean()) and c["n"] == len(g) == 10
        e = emprt[(emprt.method == m) & (emprt.target_kind == "true")]
        diff = (e.complexity_randomised - e.complexity_original).to_numpy()
        assert s["emprt_complexity_rise"]["effect"] == pytest.approx(diff.mean(), abs=1e-12)
        assert s["emprt_complexity_rise"]["p_adjusted"] >= s["emprt_complexity_rise"]["p"]
        assert set(s) >= {"deletion_auc", "road_morf_auc", "road_lerf_auc", "road_lerf_vs_morf", "emprt_complexity_rise"}
    # same seed, same bytes; switched off, neither file nor key
    again = run_stage(tiny_run, tmp_path / "b")
    for f in ("road.parquet", "mprt.parquet", "metrics.json"):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    off = run_stage(tiny_run, tmp_path / "c", road=False, mprt_variant=False)
    assert not (off / "road.parquet").exists() and not (off / "mprt.parquet").exists()
    assert "road_morf_auc" not in json.loads((off / "metrics.json").read_text())["saliency"]
