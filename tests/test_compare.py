"""``probe compare``: CKA between runs on the same images, units matched across runs, CKA over snapshots, and
the report's comparison section. Checked against independent facts: a run whose conv1 channels are permuted
(the next layer's inputs permuted to match, so the network computes the same function) has CKA 1 with the
original at every layer and its units matched back by the inverse permutation; the stage's CKA equals the
minibatch estimator computed by brute force (float64 unbiased HSIC of each minibatch on the captured outputs)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CHEAP, TINY_TRAIN
from probe.pipeline.cli import main
from probe.pipeline.rundir import load_run, save_weights

PERM = [2, 0, 3, 1]  # channel j of the permuted copy is channel PERM[j] of the original


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a, b, perm = root / "a", root / "b", root / "a_perm"
    assert main(["train", *TINY_TRAIN, "seed=0", "train.snapshot_epochs=[0,1]", f"run_dir={a}"]) == 0
    assert main(["train", *TINY_TRAIN, "seed=1", f"run_dir={b}"]) == 0
    assert main(["synthesize", f"run={a}", *CHEAP["synthesize"], "synthesis.dream.enabled=false", "synthesis.channels=1",
                 "data.limit=40"]) == 0  # class images of a, judged by the others below
    shutil.copytree(a, perm, ignore=shutil.ignore_patterns("snapshots"))  # its synthesis/ is stale there
    model = load_run(a).model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.weight"], state["conv1.bias"] = state["conv1.weight"][PERM], state["conv1.bias"][PERM]
    state["conv2.weight"] = state["conv2.weight"][:, PERM]
    model.load_state_dict(state)
    save_weights(model, perm / "model.safetensors")
    for run in (a, b, perm):  # conv1: the layer whose channels a_perm permutes
        assert main(["concepts", f"run={run}", *CHEAP["concepts"], "concepts.layer=conv1", "concepts.k=3",
                     "concepts.stability=false", "concepts.ks=[2]"]) == 0
    out = root / "comparisons"
    assert main(["compare", f"runs=[{a},{b},{perm}]", f"out_dir={out}", "data.batch_size=16", "data.limit=100"]) == 0
    return root, out / "default"


def _cka(folder):
    return pd.read_parquet(folder / "cka.parquet")


def test_a_permuted_copy_has_cka_1_with_its_original_at_every_layer(runs):
    _, folder = runs
    df = _cka(folder)
    same = df[(df.run_a == "a") & (df.run_b == "a_perm") & (df.layer_a == df.layer_b)]
    assert sorted(same.layer_a) == sorted(["conv1", "pool", "conv2", "gap", "fc"])
    np.testing.assert_allclose(same.cka, 1.0, atol=1e-5)
    diag = df[(df.run_a == df.run_b) & (df.layer_a == df.layer_b)]
    np.testing.assert_allclose(diag.cka, 1.0, atol=1e-6)  # every layer with itself
    other = df[(df.run_a == "a") & (df.run_b == "b") & (df.layer_a == "fc") & (df.layer_b == "fc")]
    assert float(other.cka.iloc[0]) < 0.999  # another seed is another representation




def test_class_images_judged_by_a_permuted_copy_get_the_makers_own_predictions(runs):
    """a_perm computes a's function, so its verdict on a's class images is a's own softmax (from a's synthesis
    metrics); b judges them too; a_perm's copied synthesis/ is stale (other weights) and b has none: not judged."""
    root, folder = runs
    t = pd.read_parquet(folder / "transfer.parquet")
    assert set(t.maker) == {"a"} and set(t.judge) == {"b", "a_perm"}
    own = pd.read_parquet(root / "a" / "synthesis" / "metrics.parquet")
    own = own[own.kind == "class"].set_index("image")
    mine = t[t.judge == "a_perm"].set_index("image")
    assert len(mine) == len(own)
    np.testing.assert_allclose(mine.probability, own.probability.loc[mine.index], atol=1e-5)
    assert (mine.predicted == own.predicted.loc[mine.index]).all()
    assert (mine.recognised == (own.predicted == own["class"]).loc[mine.index]).all()


def test_concepts_are_matched_by_their_coefficients_on_the_same_images(runs):
    """a_perm's conv1 is a's with its channels permuted: its concepts are a's, present in the same images, so
    every one is matched with correlation 1, though its directions are other vectors of channels. Every pair's
    matching is the best of all one-to-one assignments of the correlations, recomputed here by brute force."""
    from itertools import permutations

    root, folder = runs
    c = pd.read_parquet(folder / "concepts.parquet")
    assert set(zip(c.run_a, c.run_b)) == {("a", "b"), ("a", "a_perm"), ("b", "a_perm")}
    assert set(c.layer_a) == set(c.layer_b) == {"conv1"}
    same = c[(c.run_a == "a") & (c.run_b == "a_perm")]
    np.testing.assert_allclose(same["corr"], 1.0, atol=1e-4)
    means = {r: np.load(root / r / "concepts" / "concepts.npz")["image_mean"].astype(np.float64) for r in ("a", "b", "a_perm")}
    for (ra, rb), g in c.groupby(["run_a", "run_b"]):
        corr = np.corrcoef(means[ra].T, means[rb].T)[:3, 3:]
        best = max(permutations(range(3)), key=lambda p: sum(corr[i, j] for i, j in enumerate(p)))
        g = g.sort_values("concept_a")
        assert list(g.concept_b) == list(best), (ra, rb)
        np.testing.assert_allclose(g["corr"], corr[np.arange(3), list(best)], atol=1e-6)
    m = json.loads((folder / "metrics.json").read_text())["concepts_matched"]
    assert m["threshold"] == 0.8 and (m["a~a_perm"]["k"], m["a~a_perm"]["n"]) == (3, 3)
    k = int((c[(c.run_a == "a") & (c.run_b == "b")]["corr"] > 0.8).sum())
    assert m["a~b"]["k"] == k and m["a~b"]["value"] == pytest.approx(k / 3)


def test_unit_matching_pairs_every_run_of_one_architecture(runs):
    _, folder = runs
    u = pd.read_parquet(folder / "units.parquet")
    assert set(zip(u.run_a, u.run_b)) == {("a", "b"), ("a", "a_perm"), ("b", "a_perm")}
    conv1 = u[(u.run_a == "a") & (u.run_b == "a_perm") & (u.layer == "conv1")]
    for kind in ("semi", "one_to_one"):
        got = conv1[conv1.matching == kind].sort_values("unit_a")
        inverse = np.argsort(PERM)  # original unit i is unit inverse[i] of the copy
        np.testing.assert_array_equal(got.unit_b.to_numpy(int), inverse)
        np.testing.assert_allclose(got["corr"], 1.0, atol=1e-5)
    later = u[(u.run_a == "a") & (u.run_b == "a_perm") & (u.layer == "conv2") & (u.matching == "one_to_one")]
    np.testing.assert_array_equal(later.unit_b.to_numpy(int), later.unit_a.to_numpy(int))  # unchanged after conv1
    m = json.loads((folder / "metrics.json").read_text())
    assert m["units_matched_above_0.8"]["a~a_perm"] == 1.0


def test_cka_is_the_minibatch_estimate_computed_by_brute_force(runs):
    """Every run sees the same images (in its own normalisation); the minibatch CKA with unbiased HSIC
    (Nguyen et al. 2021) recomputed in float64 from the captured outputs equals the stage's."""
    from probe.hooks import layer_outputs
    from probe.pipeline.analysis import run_data
    from probe.similarity import hsic_unbiased

    root, folder = runs
    feats = {}
    for name in ("a", "b"):
        r = load_run(root / name)
        ds = run_data(r.card).split("test")
        x = torch.stack([ds[i][0] for i in range(96)])  # 100 images, minibatches of 16: 6 used, 4 left over
        with torch.no_grad():
            _, outs = layer_outputs(r.model, x, ["conv2", "fc"])
        feats[name] = {k: v.flatten(1).double().numpy() for k, v in outs.items()}

    def minibatch_cka(x, y):
        h = np.zeros(3)
        for lo in range(0, 96, 16):
            xs, ys = x[lo:lo + 16], y[lo:lo + 16]
            K, L = xs @ xs.T, ys @ ys.T
            h += [hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)]
        return h[0] / np.sqrt(h[1] * h[2])

    df = _cka(folder)
    for la, lb in (("conv2", "fc"), ("fc", "fc"), ("conv2", "conv2")):
        row = df[(df.run_a == "a") & (df.layer_a == la) & (df.run_b == "b") & (df.layer_b == lb)].iloc[0]
        assert row.batches == 6 and row.images == 96
        assert row.cka == pytest.approx(minibatch_cka(feats["a"][la], feats["b"][lb]), abs=1e-4)
    m = json.loads((folder / "metrics.json").read_text())
    assert (m["images"], m["images_unused"], m["batch_size"]) == (96, 4, 16)


def test_snapshots_converge_to_the_final_weights(runs):
    root, folder = runs
    dyn = pd.read_parquet(folder / "dynamics.parquet")
    assert set(dyn.run) == {"a"} and sorted(set(dyn.epoch)) == [0, 1]
    final = dyn[dyn.epoch == 1]  # one epoch of training: the snapshot at epoch 1 is the final state
    np.testing.assert_allclose(final.cka, 1.0, atol=1e-6)
    assert (dyn[dyn.epoch == 0].cka < 1 - 1e-4).any()


def test_runs_on_other_images_are_refused_naming_the_key(runs, tmp_path, capsys):
    root, _ = runs
    other = tmp_path / "other"
    assert main(["train", *TINY_TRAIN, "data.split_seed=3", f"run_dir={other}"]) == 0
    capsys.readouterr()
    assert main(["compare", f"runs=[{root / 'a'},{other}]", f"out_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert "data.split_seed=3" in err and "same images" in err
    assert not (tmp_path / "c").exists()


def test_the_report_shows_the_comparison_and_flags_it_stale_after_retraining(runs, tmp_path):
    root, folder = runs
    out = tmp_path / "reports"
    assert main(["report", f"runs=[{root / 'a'},{root / 'b'},{root / 'a_perm'}]", f"out_dir={out}",
                 f"comparison={folder}"]) == 0
    numbers = json.loads((out / "default" / "report.json").read_text())
    assert "comparison" in numbers["tables"] and not numbers["missing"].get("comparison")
    units = [t for t in numbers["tables"]["comparison"] if t["caption"].startswith("Units matched")]
    assert units and any(row[:2] == ["a vs a_perm", "conv1"] for row in units[0]["rows"])
    moved = tmp_path / "b"
    shutil.copytree(root / "b", moved)
    assert main(["train", *TINY_TRAIN, "seed=2", f"run_dir={moved}"]) == 0  # other weights, same label
    assert main(["report", f"runs=[{root / 'a'},{moved}]", f"out_dir={out}", f"comparison={folder}"]) == 0
    missing = json.loads((out / "default" / "report.json").read_text())["missing"]["comparison"]
    assert [m["run"] for m in missing] == ["b"] and "other weights" in missing[0]["why"]
    assert missing[0]["command"].startswith("probe compare 'runs=[")


def test_the_concepts_page_states_each_match_with_its_interval(runs, tmp_path):
    from probe.uncertainty import proportion_interval

    root, folder = runs
    out = tmp_path / "reports"
    assert main(["report", f"runs=[{root / 'a'},{root / 'b'},{root / 'a_perm'}]", f"out_dir={out}",
                 f"comparison={folder}"]) == 0
    numbers = json.loads((out / "default" / "report.json").read_text())
    assert not numbers["missing"].get("concepts")
    shared = next(t for t in numbers["tables"]["concepts"] if t["caption"].startswith("Concepts shared between runs"))
    c = pd.read_parquet(folder / "concepts.parquet")
    for row in shared["rows"]:
        a, b = row[0].split(" (")[0], row[1].split(" (")[0]
        corr = c[(c.run_a == a) & (c.run_b == b)]["corr"]
        k = int((corr > 0.8).sum())
        e = proportion_interval(k, len(corr))
        assert row[2].startswith(f"{k} of {len(corr)}: {e.value:.2f}") and f"{e.low:.2f}" in row[2], row
    assert any(r[:2] == ["a (conv1)", "a_perm (conv1)"] and r[2].startswith("3 of 3") for r in shared["rows"])
    claims = [x for x in numbers["claims"] if x["section"] == "concepts" and "partner in" in x["subject"]]
    assert {(x["run"], x["stat"]["k"]) for x in claims} >= {("a", 3)}
    html = (out / "default" / "concepts.html").read_text()
    assert "a and a_perm: concepts matched above 0.8" in html
    # each run's importance table is its concepts.npz, class by class
    z = np.load(root / "a" / "concepts" / "concepts.npz")
    imp = next(t for t in numbers["tables"]["concepts"] if t["caption"].startswith("a: importance"))
    for j, row in enumerate(imp["rows"]):
        got = [float(v.replace("\u2212", "-")) if v else np.nan for v in row[1:]]
        np.testing.assert_allclose(got, z["importance"][:, j], rtol=0.05, atol=0.006)


def test_the_minibatch_leaves_at_least_two_of_them_and_a_tiny_split_is_refused():
    from probe.errors import ConfigError
    from probe.pipeline.compare.stage import minibatch_size

    assert minibatch_size(270, 64) == 64 and minibatch_size(36, 64) == 18 and minibatch_size(8, 64) == 4
    with pytest.raises(ConfigError, match="data.split: 7 images"):
        minibatch_size(7, 64)
