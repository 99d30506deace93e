"""Geometry stage: equivariance, invariance and effective receptive fields against closed forms."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from probe.geometry.erf import erf_maps, erf_size
from probe.geometry.fields import layer_fields
from probe.geometry.invariance import transforms
from probe.geometry.tables import equivariance_table, invariance_table
from probe.geometry.transforms import affine, shift
from probe.hooks import batched_layer_outputs


def wilson(k, n, z=1.959963984540054):
    """Wilson's score interval, written out (Wilson 1927; Brown, Cai & DasGupta 2001, eq. 4)."""
    p = k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * np.sqrt(n) / (n + z * z) * np.sqrt(p * (1 - p) + z * z / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def circular_stack(stride2: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
              nn.Conv2d(4, 4, 3, stride=2 if stride2 else 1, padding=1, padding_mode="circular"), nn.ReLU(),
              nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")]
    return nn.Sequential(*layers).eval()


def fields_for(model, x, layers):
    _, outs = batched_layer_outputs(model, x[:1], layers)
    return layer_fields(model, x[:1], outs)


def test_shift_matches_brute_force():
    x = torch.randn(2, 3, 6, 7)
    fill = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    z = shift(x, 2, -1, "zero", fill)
    for c in range(3):
        assert torch.all(z[:, c, :, :2] == fill[0, c, 0, 0])
    assert torch.equal(z[..., 2:], x[..., :-2])
    assert torch.equal(shift(x, -3, -2, "zero", 0.0)[..., :3, :], x[..., 3:, :])
    assert torch.equal(shift(x, 3, -2, "circular"), torch.cat([x[..., -3:, :], x[..., :-3, :]], dim=-2))
    # a zero rotation and unit scale sample exactly at the pixel centres
    assert torch.allclose(affine(x, 0.0, 1.0, fill), x, atol=1e-5)
    # a 90 degree rotation of a square image is a transpose and a flip, whatever the fill
    xs = torch.randn(1, 1, 5, 5)
    assert torch.allclose(affine(xs, 90.0), torch.rot90(xs, 1, (-2, -1)), atol=1e-5) or \
        torch.allclose(affine(xs, 90.0), torch.rot90(xs, -1, (-2, -1)), atol=1e-5)


def test_ideal_conv_stack_is_exactly_equivariant_under_circular_shifts():
    model = circular_stack()
    x = torch.randn(3, 1, 12, 12)
    layers = ["0", "2", "4"]
    df = equivariance_table(model, x, layers, fields_for(model, x, layers), [1, 2, 3, 5], ["x", "y"], ["circular"])
    assert len(df) == 3 * 2 * 4
    assert not df["fractional"].any()
    assert (df["feature_shift"] == df["shift"]).all()
    assert df["error"].max() < 1e-5


def test_stride_two_aliases_odd_shifts_and_is_exact_on_even_ones():
    model = circular_stack(stride2=True)
    x = torch.randn(3, 1, 12, 12)
    layers = ["0", "2", "4"]
    fields = fields_for(model, x, layers)
    assert fields["2"].stride == (2, 2) and fields["0"].stride == (1, 1)
    df = equivariance_table(model, x, layers, fields, [1, 2, 3, 4], ["x"], ["circular"])
    deep = df[df["layer"].isin(["2", "4"])]
    even, odd = deep[deep["shift"] % 2 == 0], deep[deep["shift"] % 2 == 1]
    assert even["error"].max() < 1e-5 and (even["feature_shift"] == even["shift"] // 2).all()
    assert odd["fractional"].all() and odd["error"].min() > 1e-2
    assert df[df["layer"] == "0"]["error"].max() < 1e-5  # before the stride: still exact
    # the reported error is the better of floor and ceiling: check one against a brute-force roll
    moved = batched_layer_outputs(model, torch.roll(x, 1, -1), ["2"])[1]["2"]
    base = batched_layer_outputs(model, x, ["2"])[1]["2"]
    brute = min(float((moved - torch.roll(base, k, -1)).norm() / base.norm()) for k in (0, 1))
    got = df[(df["layer"] == "2") & (df["shift"] == 1)]["error"].item()
    assert got == pytest.approx(brute, rel=1e-6)


def test_zero_filled_shift_compares_the_overlap():
    # a 1x1 conv is pointwise: zero-filled shifts are exact on the overlap, whatever the fill
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    x = torch.randn(2, 1, 8, 8)
    df = equivariance_table(model, x, ["0", "2"], fields_for(model, x, ["0", "2"]), [1, 3, -2], ["x", "y"],
                            ["zero"], fill=-0.7)
    assert df["error"].max() < 1e-6


@pytest.mark.parametrize("mode", ["circular", "zero"])
def test_zero_padding_errors_sit_at_the_border(mode):
    # ordinary zero padding breaks equivariance at the border only; away from it, stride 1 is exact
    # and stride 2 is exact for even shifts, aliased for odd ones
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)).eval()
    x = torch.randn(3, 1, 24, 24)
    df = equivariance_table(model, x, ["0", "2"], fields_for(model, x, ["0", "2"]), [1, 2, -2, 3], ["x", "y"], [mode],
                            fill=0.3)
    first, second = df[df["layer"] == "0"], df[df["layer"] == "2"]
    assert first["error"].min() > 1e-3 and first["error_interior"].max() < 1e-5
    assert (first["interior_units"] > 0).all()
    even, odd = second[second["shift"] % 2 == 0], second[second["shift"] % 2 == 1]
    assert even["error_interior"].max() < 1e-5 and odd["error_interior"].min() > 1e-2
    # layer "2" (RF 5, stride 2): unit u sees pixels 2u-2 .. 2u+2; brute-force count for a shift of +2
    # (unit u of the shifted map must see moved content only, its partner u-1 no padding)
    row = second[(second["shift"] == 2) & (second["axis"] == "x")].iloc[0]
    count = sum(1 for u in range(12) if 2 * u - 2 >= 2 and 2 * u + 2 <= 23 and 2 * (u - 1) - 2 >= 0)
    assert row["interior_units"] == count


def single_conv(n: int) -> nn.Sequential:
    convs = [nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(n)]
    for c in convs:
        nn.init.ones_(c.weight)
    return nn.Sequential(*convs).eval()


@pytest.mark.parametrize("depth,side", [(1, 3), (2, 5)])
def test_erf_of_all_ones_3x3_convs(depth, side):
    model = single_conv(depth)
    x = torch.randn(4, 1, 15, 15)
    layers = [str(i) for i in range(depth)]
    maps = erf_maps(model, x, layers)
    m, (uy, ux) = maps[str(depth - 1)]
    assert (uy, ux) == (7, 7)
    support = np.argwhere(m > 0)
    assert support.min(0).tolist() == [7 - side // 2] * 2 and support.max(0).tolist() == [7 + side // 2] * 2
    centre = fields_for(model, x, layers)[str(depth - 1)].centre0
    assert centre == (0.0, 0.0)
    got_side, radius = erf_size(m, (centre[0] + uy, centre[1] + ux), 0.95)
    assert got_side == side
    assert erf_size(m, None, 0.95)[0] == side  # the centre of mass is the same centre here
    # the profile of two stacked all-ones 3x3 convs is the outer product of (1, 2, 3, 2, 1)
    if depth == 2:
        tri = np.array([1, 2, 3, 2, 1.0])
        assert np.allclose(m[5:10, 5:10], np.outer(tri, tri))
        # 3x3 holds 49/81 of the mass: below 0.6 mass the ERF is 3 wide
        assert erf_size(m, (7, 7), 0.6)[0] == 3 and erf_size(m, (7, 7), 0.61)[0] == 5


def test_invariance_of_circular_conv_and_global_pooling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    x, y = torch.randn(8, 1, 10, 10), torch.randint(0, 5, (8,))
    ts = transforms([1, 2, 5], ["x", "y"], ["circular", "zero"], [10.0], [1.1], fill=-1.0)
    df = invariance_table(model, x, y, ["0", "2", "4"], ts)
    circ = df[(df["transform"] == "shift") & (df["mode"] == "circular")]
    assert len(circ) == 3 * 2 * 4
    assert circ["change"].max() < 1e-5
    out = circ[circ["layer"] == "output"]
    assert (out["survival"] == 1.0).all() and out["prob_change"].max() < 1e-6
    assert (out["accuracy"] == out["accuracy_clean"]).all()
    # zero-filled shifts and rotations change what the network sees: the table must show it
    others = df[(df["layer"] == "output") & (df["mode"] == "zero")]
    assert others["change"].min() > 1e-3
    # survival and accuracy against a direct computation
    rot = df[(df["transform"] == "rotate") & (df["layer"] == "output")]
    with torch.no_grad():
        p0, p1 = model(x).argmax(1), model(affine(x, 10.0, fill=-1.0)).argmax(1)
    assert rot["survival"].item() == pytest.approx(float((p0 == p1).float().mean()))
    assert rot["accuracy"].item() == pytest.approx(float((p1 == y).float().mean()))


@pytest.mark.slow
def test_cli_end_to_end_writes_every_file(tmp_path):
    from probe.pipeline.cli import main

    run = tmp_path / "run"
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=1", "train.snapshot_epochs=[0,1]",
                 f"run_dir={run}", f"hydra.run.dir={tmp_path / 'h'}"]) == 0
    assert main(["geometry", f"run={run}", "data.probe_per_class=2", "geometry.shift.shifts=[1,2]",
                 "geometry.shift.axes=[x]", "geometry.invariance.rotations=[5]", "geometry.invariance.scales=[1.1]",
                 "geometry.erf.noise_images=4"]) == 0
    out = run / "geometry"
    expected = {"equivariance.parquet", "invariance.parquet", "erf.parquet", "erf_maps.npz", "metrics.json",
                "erf_heatmaps.png", "erf_vs_depth.png", "equivariance_by_depth.png", "shift_survival.png",
                "dynamics.parquet", "dynamics_filters.npz", "dynamics.png", "dynamics_filters.png"}
    assert expected <= {p.name for p in out.iterdir()}
    eq = pd.read_parquet(out / "equivariance.parquet")
    # tiny_cnn: conv1 and pool (stride 2) and conv2 have maps; the global pool's is 1x1 (a row that says it
    # cannot be measured), fc has none
    assert set(eq["layer"]) == {"conv1", "pool", "conv2", "gap"}
    assert len(eq) == 4 * 2 * 1 * 2
    assert eq[(eq["layer"] == "conv2") & (eq["shift"] == 1)]["fractional"].all()
    gap = eq[eq["layer"] == "gap"]
    assert (~gap["measurable"]).all() and gap["error"].isna().all() and (gap[["map_h", "map_w"]] == 1).all().all()
    assert eq[eq["layer"] != "gap"]["measurable"].all()
    inv = pd.read_parquet(out / "invariance.parquet")
    assert set(inv["transform"]) == {"shift", "rotate", "scale"}
    # the stage's survival agrees with a direct forward pass on the same probe images
    from probe.pipeline.analysis import open_run
    from probe.pipeline.config import AnalysisData
    from probe.pipeline.geometry.config import GeometryStage
    from probe.geometry.transforms import shift as move

    ctx = open_run(GeometryStage(run=str(run), data=AnalysisData(probe_per_class=2)))
    assert len(ctx.probe_x) == 20
    black = (0 - torch.tensor(ctx.data.mean).view(1, -1, 1, 1)) / torch.tensor(ctx.data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        p0 = ctx.run.model(ctx.probe_x).argmax(1)
        p1 = ctx.run.model(move(ctx.probe_x, 1, -1, "zero", black)).argmax(1)
    row = inv[(inv["layer"] == "output") & (inv["transform"] == "shift") & (inv["mode"] == "zero") & (inv["amount"] == 1)]
    assert row["survival"].item() == pytest.approx(float((p0 == p1).float().mean()))
    erf = pd.read_parquet(out / "erf.parquet")
    assert set(erf["input"]) == {"probe", "noise"}
    conv1 = erf[(erf["layer"] == "conv1")]
    assert (conv1["trf"] == 3).all() and (conv1["erf_side"] <= 3).all()
    dyn = pd.read_parquet(out / "dynamics.parquet")
    assert set(dyn["epoch"]) == {0, 1} and dyn["dead_fraction"].between(0, 1).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"equivariance", "survival", "erf", "weights_sha256"}
    k = int((p0 == p1).sum())
    got = metrics["survival"]["shift1_x_zero"]
    assert (got["k"], got["n"], got["method"]) == (k, 20, "wilson") and got["value"] == pytest.approx(k / 20)
    assert (got["low"], got["high"]) == pytest.approx(wilson(k, 20))
    assert row["k"].item() == k and row["n"].item() == 20
    assert set(metrics["equivariance"]) == {"conv1", "pool", "conv2", "gap"}
    gap_depth = int(eq[eq["layer"] == "gap"]["depth"].iloc[0])
    assert metrics["equivariance"]["gap"] == {"depth": gap_depth, "map_h": 1, "map_w": 1, "stride": 16.0, "measurable": False}
    counts = np.bincount(p0.numpy())
    assert metrics["survival"]["chance_agreement"] == pytest.approx(float(((counts / counts.sum()) ** 2).sum()))
    # bad config: exit 2, nothing lost
    before = sorted(p.name for p in out.iterdir())
    assert main(["geometry", f"run={run}", "geometry.shift.modes=[wrap]"]) == 2
    assert main(["geometry", f"run={run}", "geometry.layers=[conv9]"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_erf_rms_of_a_uniform_3x3_block():
    m = np.zeros((9, 9))
    m[3:6, 3:6] = 1.0
    from probe.geometry.erf import erf_rms

    # mean squared distance: 4 corners at 2, 4 edges at 1, centre at 0 -> 12 / 9
    assert erf_rms(m, (4, 4)) == pytest.approx(np.sqrt(12 / 9))
    assert erf_rms(m) == pytest.approx(np.sqrt(12 / 9))


def test_snapshot_synthetic_images_activate_their_channel(tmp_path):
    """With train.snapshot_epochs, geometry renders the same channels at every snapshot; each image
    activates its channel (checked by a direct forward pass of that snapshot) more than a grey image."""
    import numpy as np
    import pandas as pd
    import torch

    from probe.pipeline.cli import main
    from probe.models import build

    run = tmp_path / "run"
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=1", "progress=false",
                 "train.snapshot_epochs=[0,1]", f"run_dir={run}"]) == 0
    assert main(["geometry", f"run={run}", "data.probe_per_class=1", "geometry.erf.noise_images=0",
                 "geometry.figures=false", "geometry.dynamics_channels=2", "geometry.dynamics_steps=24"]) == 0
    images = np.load(run / "geometry" / "dynamics_synthesis.npz")
    assert sorted(images.files) == ["epoch_0000", "epoch_0001"]
    table = pd.read_parquet(run / "geometry" / "dynamics_synthesis.parquet")
    card = json.loads((run / "card.json").read_text())
    mean = torch.tensor(card["data"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["data"]["std"]).view(1, -1, 1, 1)
    for epoch in (0, 1):
        model = build("tiny_cnn", weights=str(run / "snapshots" / f"epoch_{epoch:04d}.safetensors"))
        pixels = torch.from_numpy(images[f"epoch_{epoch:04d}"])
        assert pixels.shape == (2, 1, 16, 16) and 0 <= pixels.min() and pixels.max() <= 1
        grey = torch.full_like(pixels, 0.5)
        layer = table["layer"].iloc[0]
        out = {}
        handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
        with torch.no_grad():
            model((pixels - mean) / std)
            reached = out["y"].mean((2, 3))
            model((grey - mean) / std)
            baseline = out["y"].mean((2, 3))
        handle.remove()
        for i in range(2):
            assert reached[i, i] > baseline[i, i]
            row = table[(table["epoch"] == epoch) & (table["channel"] == i)]
            assert abs(float(row["activation"].iloc[0]) - float(reached[i, i])) < 1e-4


def test_lenet5_equivariance_is_named_by_the_layer_it_was_measured_on():
    """LeNet-5's conv3 maps 5x5 to 1x1: no shift can be seen there. Every row and every headline entry must
    name the layer it was measured on, with that layer's own map size, and hold that layer's error
    (recomputed here with hooks and torch.roll, per layer); conv3 is there, says it cannot be measured, and
    carries no number: a "last conv" entry silently holding conv2's error cannot happen."""
    from probe.hooks import default_layers
    from probe.geometry.tables import transform_tables
    from probe.pipeline.geometry.stage import equivariance_headline, survival_headline
    from probe.models import build

    torch.manual_seed(0)
    model = build("lenet5").eval()
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    layers = default_layers(model)
    fields = fields_for(model, x, layers)
    ts = transforms([1, 2], ["x", "y"], ["circular", "zero"], [], [], fill=-0.4)
    eq, inv = transform_tables(model, x, layers, ts, y=y, fields=fields, batch_size=64, device=torch.device("cpu"))

    mods = dict(model.named_modules())

    def outputs(z):
        got = {}
        hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.detach().double())) for n in layers]
        with torch.no_grad():
            logits = model(z)
        for h in hooks:
            h.remove()
        return logits, got

    logits0, base = outputs(x)
    shapes = {n: tuple(t.shape) for n, t in base.items()}
    assert shapes["conv3"][-2:] == (1, 1) and shapes["conv2"][-2:] == (10, 10)
    spatial = [n for n in layers if len(shapes[n]) == 4]
    assert set(eq["layer"]) == set(spatial)  # every layer with a map has rows, conv3 included
    for r in eq.itertuples():
        assert (r.map_h, r.map_w) == shapes[r.layer][-2:]
        assert r.measurable == (shapes[r.layer][-1 if r.axis == "x" else -2] > 1)
    head = equivariance_headline(eq)
    strides = {"conv1": 1, "pool1": 2, "conv2": 2, "pool2": 4, "conv3": 4}  # input pixels between units, by hand
    assert head["conv3"] == {"depth": layers.index("conv3"), "map_h": 1, "map_w": 1, "stride": 4.0, "measurable": False}
    for name in spatial:
        if name == "conv3":
            continue
        assert (head[name]["map_h"], head[name]["map_w"]) == shapes[name][-2:] and head[name]["depth"] == layers.index(name)
        stride = strides[name]
        assert head[name]["stride"] == stride
        errs = []
        for dim in (-1, -2):  # circular shift by 1 px; feature shifts floor and ceil of 1 / stride
            _, moved = outputs(torch.roll(x, 1, dims=dim))
            ks = {int(np.floor(1 / stride)), int(np.ceil(1 / stride))}
            errs.append(min(float((moved[name] - torch.roll(base[name], k, dims=dim)).norm() / base[name].norm()) for k in ks))
        assert head[name]["shift1_circular"] == pytest.approx(np.mean(errs), rel=1e-5)
    assert head["conv2"]["shift1_circular"] != pytest.approx(head["conv1"]["shift1_circular"])

    # survival per shift: k of n against a direct count, Wilson's interval against its closed form
    surv = survival_headline(inv)
    pred0 = logits0.argmax(1)
    for t in ts:
        logits, _ = outputs(t.apply(x))
        k = int((logits.argmax(1) == pred0).sum())
        got = surv[f"shift{int(t.amount)}_{t.axis}_{t.mode}"]
        assert (got["k"], got["n"]) == (k, 6)
        assert (got["low"], got["high"]) == pytest.approx(wilson(k, 6))
    assert surv["accuracy_clean"]["k"] == int((pred0 == y).sum())
