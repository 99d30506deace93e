"""The Python API (``import probe``): the README's code runs, and each call agrees with an independent
computation (brute force over all activations, autograd, closed forms, plain forward hooks)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import probe
from probe.hooks import batched_layer_outputs, first_conv, layer_outputs, middle_conv, spaced_convs
from probe.images import minmax, rows_of, tile_grid

README = Path(__file__).resolve().parents[1] / "README.md"
LIBRARY = ["probe", "probe.models", "probe.activations", "probe.saliency", "probe.synthesis", "probe.geometry",
           "probe.hooks", "probe.data"]


def hooked(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of ``names`` by plain forward hooks (cloned in the hook), without probe's helpers."""
    mods, got = dict(model.named_modules()), {}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.detach().double().clone()))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def small_net(log_softmax: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)]
    return nn.Sequential(*layers, *([nn.LogSoftmax(dim=1)] if log_softmax else [])).eval()


# -- the README ------------------------------------------------------------------------------------------
def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of README.md runs as it is, each in a fresh namespace, in an empty folder."""
    blocks = readme_blocks()
    assert blocks and any("import probe" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": f"readme_block_{i}"})
        assert out.getvalue().strip(), f"README block {i} printed nothing"


# -- import hygiene ---------------------------------------------------------------------------------------
def imported_after(code: str) -> dict:
    """Top-level packages in sys.modules after running ``code`` in a fresh interpreter."""
    probe_code = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe_code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_library_imports_no_hydra_omegaconf_or_dvc():
    """Every library subpackage and every name of the API, imported together (so each one alone as well)."""
    loaded = imported_after("\n".join(f"import {m}" for m in LIBRARY) + "\n[getattr(probe, n) for n in probe.__all__]")
    assert {"torch", "captum", "probe"} <= loaded
    assert not loaded & {"hydra", "omegaconf", "dvc"}, loaded & {"hydra", "omegaconf", "dvc"}


def test_import_probe_is_cheap_and_its_names_load_on_use():
    assert not imported_after("import probe") & {"torch", "hydra", "omegaconf", "dvc"}
    for name in probe.__all__:
        assert getattr(probe, name) is not None, name
    assert probe.collect is __import__("probe.activations", fromlist=["collect"]).collect
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probe.nope  # noqa: B018


# -- statistics --------------------------------------------------------------------------------------------
def test_collect_matches_brute_force_over_every_activation():
    """Mean, std, min, max and the share of positive values per channel equal those of all activations held
    in memory (float64); class means equal the per-label means; two merged halves equal one pass."""
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    stats = probe.collect(model, loader)  # default layers, device and number of classes (the output's width)
    assert list(stats.layers) == ["0", "2", "3", "5", "7"] and stats["0"].num_classes == 3
    # in the loader's batches: a convolution's float bits depend on the batch it is computed in (AVX-512 kernels)
    parts = [hooked(model, x[i:i + 7], list(stats.layers)) for i in range(0, len(x), 7)]
    acts = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    table = stats.table()
    for name, a in acts.items():
        a = a if a.dim() == 4 else a[:, :, None, None]
        per = a.transpose(0, 1).reshape(a.shape[1], -1)  # (C, all positions of all images)
        rows = table[table.layer == name].sort_values("channel")
        np.testing.assert_allclose(rows["mean"], per.mean(1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rows["std"], per.std(1, unbiased=False), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(rows["min"], per.min(1).values.float().double())
        np.testing.assert_array_equal(rows["max"], per.max(1).values.float().double())
        np.testing.assert_allclose(rows["frac_active"], (per > 0).double().mean(1))
        class_means = np.stack([a[y == k].mean((0, 2, 3)).numpy() for k in range(3)])
        np.testing.assert_allclose(stats[name].class_means(), class_means, rtol=1e-6, atol=1e-7)
    halves = [probe.collect(model, [(x[:20], y[:20])], ["3"]), probe.collect(model, [(x[20:], y[20:])], ["3"], start=20)]
    merged = halves[0].merge(halves[1])
    np.testing.assert_allclose(merged.table()["mean"], table[table.layer == "3"]["mean"], rtol=1e-6)
    # exemplars: the top image per channel has the highest spatial mean, as a global index
    means = acts["3"].mean((2, 3))
    top = merged.exemplars["3"].state()["index"][:, 0]
    np.testing.assert_array_equal(top, means.argmax(0).numpy())


def test_population_stats_save_and_load_round_trip(tmp_path):
    model = small_net()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    stats = probe.collect(model, [(x, y)], ["0", "7"], top_k=2)
    stats.save(tmp_path / "state.npz")
    back = probe.PopulationStats.load(tmp_path / "state.npz")
    assert list(back.layers) == ["0", "7"] and back.exemplars["0"].k == 2
    pd.testing.assert_frame_equal(back.table(), stats.table())
    assert back.exemplars["7"].state()["index"].tolist() == stats.exemplars["7"].state()["index"].tolist()


def test_unknown_layers_raise_layer_not_found_naming_the_argument():
    model = small_net()
    with pytest.raises(probe.LayerNotFound, match=r"^layers: layer '9' does not exist.*valid layers: 0, 1, 2"):
        probe.collect(model, [(torch.zeros(1, 1, 8, 8), torch.zeros(1))], ["9"])
    with pytest.raises(ValueError, match=r"^layer: layer 'conv' does not exist"):  # a ValueError, its own name
        probe.render_layer(model, "conv", input_shape=(1, 8, 8), steps=1)


# -- attributions ------------------------------------------------------------------------------------------
def test_attribution_maps_are_autograd_gradients_of_the_logit():
    """Plain gradients: |d logit_target / dx| summed over channels, by autograd on the net without its final
    LogSoftmax (what is attributed is the score before it); the model itself is left as it was."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.LogSoftmax(dim=1)).eval()
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([4, 0, 2])
    got = probe.attribution_maps(model, x, t, "saliency")
    xr = x.clone().requires_grad_(True)
    logits = model[:-1](xr)
    (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xr)
    assert got.shape == (3, 8, 8)
    torch.testing.assert_close(got, grad.abs().sum(1), rtol=1e-5, atol=1e-7)
    assert model[1].inplace  # the copy, not the model, was changed
    ixg = probe.attribution_maps(model, x, 1, "input_x_gradient")  # one target for all images
    (g1,) = torch.autograd.grad(model[:-1](xr)[:, 1].sum(), xr)
    torch.testing.assert_close(ixg, (g1 * x).sum(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^method: 'salency' is not allowed \(did you mean 'saliency'\?\)"):
        probe.attribution_maps(model, x, t, "salency")


def test_faithfulness_matches_brute_force_deletion_insertion_and_road():
    """Deletion / insertion AUC by deleting pixels one step at a time in a Python loop (RISE: trapezoid over the
    fraction in [0, 1]); ROAD with noise 0 by solving each imputation as a dense linear system."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).eval()
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([1, 3])
    maps = torch.randn(2, 4, 4)  # distinct values: no ties
    fractions, steps = [0.25, 0.5, 0.75], 4
    got = probe.faithfulness_metrics(model, x, t, maps, steps=steps, fractions=fractions, noise_std=0.0)

    def prob(img, k):
        with torch.no_grad():
            return float(torch.softmax(model(img[None]), 1)[0, k])

    for n in range(2):
        order = np.argsort(-maps[n].flatten().numpy(), kind="stable")
        dele, ins = [], []
        for s in range(steps + 1):
            mask = np.zeros(16, bool)
            mask[order[: s * 16 // steps]] = True
            m = torch.from_numpy(mask.reshape(1, 4, 4))
            dele.append(prob(torch.where(m, 0.0, x[n]), t[n]))
            ins.append(prob(torch.where(m, x[n], 0.0), t[n]))
        trapz = lambda c: sum((a + b) / 2 for a, b in zip(c, c[1:])) / steps  # noqa: E731
        assert got.deletion_auc[n] == pytest.approx(trapz(dele), rel=1e-6)
        assert got.insertion_auc[n] == pytest.approx(trapz(ins), rel=1e-6)
        for name, o in (("road_morf_auc", order), ("road_lerf_auc", order[::-1])):
            curve = [prob(dense_imputation(x[n], o[: int(f * 16)]), t[n]) for f in fractions]
            area = sum((a + b) / 2 * (f1 - f0) for a, b, f0, f1 in zip(curve, curve[1:], fractions, fractions[1:]))
            assert got[name][n] == pytest.approx(area / (fractions[-1] - fractions[0]), rel=1e-6, abs=1e-9)


def dense_imputation(img: torch.Tensor, removed: np.ndarray) -> torch.Tensor:
    """Each removed pixel = the weighted mean of its in-image 8 neighbours (1/6 direct, 1/12 diagonal, weights
    renormalised), removed neighbours included: one dense linear system (Rong et al. 2022's noiseless imputation)."""
    c, h, w = img.shape
    idx = {int(p): i for i, p in enumerate(removed)}
    a, b = np.zeros((len(idx), len(idx))), np.zeros((len(idx), c))
    for p, i in idx.items():
        r, q = divmod(p, w)
        for dr in (-1, 0, 1):
            for dq in (-1, 0, 1):
                if (dr, dq) == (0, 0) or not (0 <= r + dr < h and 0 <= q + dq < w):
                    continue
                wt = 1 / 12 if dr and dq else 1 / 6
                a[i, i] += wt
                j = (r + dr) * w + q + dq
                if j in idx:
                    a[i, idx[j]] -= wt
                else:
                    b[i] += wt * img[:, r + dr, q + dq].double().numpy()
    out = img.clone().reshape(c, -1)
    if idx:
        out[:, list(idx)] = torch.from_numpy(np.linalg.solve(a, b).T).float()
    return out.reshape(c, h, w)


# -- feature visualisation -----------------------------------------------------------------------------------
def test_render_layer_raises_each_channel_and_reports_it_truthfully():
    """One image per channel; the objective reported is the channel's spatial mean on the returned pixels
    (recomputed with plain hooks), higher than on the starting image (steps=0, same seeds)."""
    model = small_net()
    mean, std = (0.5,), (0.25,)
    res = probe.render_layer(model, "3", input_shape=(1, 8, 8), steps=20, lr=0.1, mean=mean, std=std)
    start = probe.render_layer(model, "3", input_shape=(1, 8, 8), steps=0, mean=mean, std=std)
    assert res.pixels.shape == (6, 1, 8, 8) and 0 <= res.pixels.min() and res.pixels.max() <= 1
    act = hooked(model, (res.pixels - 0.5) / 0.25, ["3"])["3"].mean((2, 3))
    np.testing.assert_allclose(res.objective.double(), act.diagonal(), rtol=1e-5, atol=1e-6)
    assert (res.objective > start.objective).all()
    two = probe.render_layer(model, "3", [4, 1], input_shape=(1, 8, 8), steps=20, lr=0.1, mean=mean, std=std)
    torch.testing.assert_close(two.pixels, res.pixels[[4, 1]], rtol=1e-4, atol=1e-5)  # seeded by channel


# -- geometry and layer tables -------------------------------------------------------------------------------
def test_equivariance_table_defaults_match_a_brute_force_roll():
    """With default layers and fields, the circular-shift error of a layer equals ||f(roll x) - roll f(x)|| / ||f(x)||
    from plain hooks (stride 1: the map moves by the same shift)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.Conv2d(3, 2, 3, padding=1)).eval()
    x = torch.randn(3, 1, 10, 10)
    df = probe.equivariance_table(model, x, shifts=[2], axes=["x"], modes=["circular"])
    assert set(df.layer) == {"0", "2"}
    for name in ("0", "2"):
        base, moved = hooked(model, x, [name])[name], hooked(model, torch.roll(x, 2, -1), [name])[name]
        brute = float((moved - torch.roll(base, 2, -1)).norm() / base.norm())
        assert df[df.layer == name].error.item() == pytest.approx(brute, rel=1e-6, abs=1e-9)
    assert df[df.layer == "0"].error.item() < 1e-6  # circular padding: exact
    assert df[df.layer == "2"].error.item() > 1e-3  # zero padding: not


def test_layer_table_counts_parameters_and_receptive_fields_in_closed_form():
    """r' = r + (k - 1) j, j' = j s for stacked convs (3x3, 3x3 stride 2, 3x3): 3, 5, 9; stride 1, 2, 2."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 4, 3, stride=2), nn.Conv2d(4, 8, 3)).eval()
    rows = probe.layer_table(model, channels=1, image_size=16)
    assert [r.receptive_field for r in rows] == [[3, 3], [5, 5], [9, 9]]
    assert [r.rf_stride for r in rows] == [[1, 1], [2, 2], [2, 2]]
    assert [r.params for r in rows] == [sum(p.numel() for p in m.parameters()) for m in model]
    assert "Total params: 392" in probe.format_table(rows, model)  # 2*9+2 + 4*2*9+4 + 8*4*9+8


# -- helpers that exist once ------------------------------------------------------------------------------------
def test_layer_selection_rules():
    convs = [nn.Conv2d(1, 1, 1) for _ in range(24)]
    model = nn.Sequential(nn.Linear(1, 1), *convs, nn.MaxPool2d(2))
    names = [str(i) for i in range(1, 25)]
    assert first_conv(model) == "1" and middle_conv(model) == names[(24 - 1) // 2] == "12"
    assert middle_conv(nn.Sequential(*convs[:3])) == "1" and middle_conv(nn.Sequential(nn.ReLU())) is None
    assert spaced_convs(model) == [names[6], names[12], names[18]]  # round(k * 24 / 4), k = 1, 2, 3
    assert spaced_convs(nn.Sequential(*convs[:5])) == ["0", "1", "2", "3", "4"]
    assert probe.default_layers(model) == ["0", *names, "25"]


def test_layer_outputs_sees_values_before_an_inplace_relu_and_stops_early():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the pass should have stopped before this layer")

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3)
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    out, acts = layer_outputs(nn.Sequential(conv, nn.ReLU(inplace=True)), x, ["0"])
    assert (out >= 0).all() and (acts["0"] < 0).any()  # the conv's output before the in-place ReLU overwrote it
    (g,) = torch.autograd.grad(acts["0"].sum(), x)  # and in the graph
    (ref,) = torch.autograd.grad(conv(x).sum(), x)
    torch.testing.assert_close(g, ref)
    out, acts = layer_outputs(nn.Sequential(conv, nn.ReLU(), Boom()), x, ["0"], output=False)
    assert out is None and list(acts) == ["0"]  # stopped once every layer asked for was captured
    net = small_net()
    whole, per_layer = layer_outputs(net, x.detach(), ["3"])
    chunked, chunked_acts = batched_layer_outputs(net, x.detach(), ["3"], batch_size=1)
    torch.testing.assert_close(chunked, whole.detach())
    torch.testing.assert_close(chunked_acts["3"], per_layer["3"].detach())


def test_minmax_and_tile_grid():
    a = np.array([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]], dtype=np.float32)
    np.testing.assert_array_equal(minmax(a, (1, 2)), [[[0, 0.25], [0.5, 1]], [[0, 0], [0, 0]]])
    np.testing.assert_array_equal(minmax(a), (a - 1) / 8)
    t = minmax(torch.from_numpy(a), (1, 2), eps=1e-12)
    np.testing.assert_array_equal(t.numpy(), minmax(a, (1, 2)))
    tiles = [np.full((2, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    grid = tile_grid(rows_of(tiles, 2), gap=1, fill=255)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1) and grid.dtype == np.uint8
    expected = np.full((7, 9), 255, np.uint8)
    expected[1:3, 1:4], expected[1:3, 5:8], expected[4:6, 1:4] = 10, 20, 30
    np.testing.assert_array_equal(grid, expected)
