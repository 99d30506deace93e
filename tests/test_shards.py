"""Sharded activations: the merge of 3 shards equals one pass over the split (independent of sharding).

Shards are whole batches of the single pass, so every activation is the same bytes. Exact: counts, min, max,
frac_active, dead, histograms, exemplars (indices, labels, positions, values), filters, feature maps, crops.
Float tolerance 1e-12 relative: mean, std, class means, selectivity (float64 sums of the same per-batch sums,
added in another order and, for the squares, about another shift).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from probe.pipeline.activations.config import parse_shard
from probe.pipeline.activations.stage import shard_range
from probe.pipeline.cli import main
from probe.errors import ConfigError

from conftest import TINY_TRAIN

COMMON = ["data.limit=100", "data.batch_size=16", "activations.top_k=5", "activations.images=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run analysed twice: in one pass (into a copy) and in 3 shards + merge."""
    import shutil

    root = tmp_path_factory.mktemp("shards")
    single = root / "single"
    assert main(["train", *TINY_TRAIN, f"run_dir={single}"]) == 0
    sharded = root / "sharded"
    shutil.copytree(single, sharded)
    assert main(["activations", f"run={single}", *COMMON]) == 0
    for i in (2, 0, 1):  # any order
        assert main(["activations", f"run={sharded}", f"activations.shard={i}/3", *COMMON]) == 0
    assert not (sharded / "activations").exists()  # a shard writes only its own state
    assert main(["activations_merge", f"run={sharded}", "activations.shards=3", *COMMON]) == 0
    return single / "activations", sharded / "activations"


def test_shards_cover_the_split_contiguously(runs):
    _, merged = runs
    infos = [json.loads((merged.parent / "activations_shards" / f"{i}-of-3" / "shard.json").read_text()) for i in range(3)]
    assert [(d["start"], d["stop"]) for d in infos] == [(0, 32), (32, 64), (64, 100)]  # 7 batches of 16: 2, 2, 3
    assert all(d["images"] == 100 for d in infos)


def test_merge_equals_single_pass(runs):
    single, merged = runs
    a, b = pd.read_parquet(single / "stats.parquet"), pd.read_parquet(merged / "stats.parquet")
    exact = ["layer", "channel", "count", "min", "max", "q01", "q50", "q99", "frac_active", "rectified",
             "frac_active_rectified", "dead"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    assert a["rectified"].notna().any() and a["rectified"].isna().any()  # tiny_cnn: relu convs, pool / gap / fc none
    np.testing.assert_allclose(b["mean"], a["mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b["std"], a["std"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b["selectivity"], a["selectivity"], rtol=1e-12, atol=1e-15, equal_nan=True)
    pd.testing.assert_frame_equal(pd.read_parquet(single / "hist.parquet"), pd.read_parquet(merged / "hist.parquet"))
    ca, cb = pd.read_parquet(single / "class_means.parquet"), pd.read_parquet(merged / "class_means.parquet")
    pd.testing.assert_frame_equal(ca.drop(columns=["mean", "mean_rectified"]), cb.drop(columns=["mean", "mean_rectified"]))
    np.testing.assert_allclose(cb["mean"], ca["mean"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cb["mean_rectified"], ca["mean_rectified"], rtol=1e-12, atol=1e-15, equal_nan=True)
    pd.testing.assert_frame_equal(pd.read_parquet(single / "exemplars.parquet"), pd.read_parquet(merged / "exemplars.parquet"))
    for name in ("filters.npz", "feature_maps.npz", "exemplar_crops.npz"):
        with np.load(single / name) as za, np.load(merged / name) as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{name}:{k}")
    ma, mb = json.loads((single / "metrics.json").read_text()), json.loads((merged / "metrics.json").read_text())
    for k in ("dead_fraction", "dead_units", "dead_fraction_layers", "dead_fraction_mean", "dead_fraction_interval"):
        assert ma[k] == mb[k], k
    assert ma["selectivity_median"].keys() == mb["selectivity_median"].keys()
    for k in ma["selectivity_median"]:
        assert mb["selectivity_median"][k] == pytest.approx(ma["selectivity_median"][k], rel=1e-12, abs=1e-15)
    for k in ma["sparsity"]:
        assert mb["sparsity"][k] == pytest.approx(ma["sparsity"][k], abs=1e-12)


def test_brute_force_exemplars(runs):
    """The merged top-1 exemplar of a channel is the image with the highest spatial mean (brute force)."""
    import torch

    from probe.pipeline.analysis import open_run
    from probe.pipeline.activations.config import ActivationsStage
    from probe.hooks import Capture
    from probe.pipeline.config import AnalysisData

    single, merged = runs
    ctx = open_run(ActivationsStage(run=str(merged.parent), data=AnalysisData(limit=100)))
    x = torch.stack([ctx.dataset[i][0] for i in range(len(ctx.dataset))])
    ex = pd.read_parquet(merged / "exemplars.parquet")
    layer = ex["layer"].iloc[0]
    with torch.no_grad(), Capture(ctx.run.model, [layer]) as cap:
        ctx.run.model(x)
    means = cap.outputs[layer].float().flatten(2).mean(2) if cap.outputs[layer].dim() == 4 else cap.outputs[layer]
    top1 = ex[(ex["layer"] == layer) & (ex["rank"] == 0)].sort_values("channel")
    best = means.max(0).values.numpy()
    np.testing.assert_allclose(means.numpy()[top1["index"].to_numpy(), top1["channel"].to_numpy()], best, rtol=1e-5)


def test_shard_range_partitions_into_whole_batches():
    for total in (0, 1, 2, 7, 100):
        for n in (1, 2, 3, 8):
            for batch in (1, 3, 16):
                parts = [shard_range(total, i, n, batch) for i in range(n)]
                assert parts[0][0] == 0 and parts[-1][1] == total
                assert all(parts[i][1] == parts[i + 1][0] for i in range(n - 1))
                assert all(a % batch == 0 for a, _ in parts)  # every shard starts at a batch boundary
                whole = [-(-(b - a) // batch) for a, b in parts]  # batches per shard
                assert max(whole) - min(whole) <= 1


@pytest.mark.parametrize("bad", ["3/3", "4/3", "-1/3", "1", "a/b", "1/0", "1/2/3"])
def test_bad_shard_is_refused(bad, capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"shard: .* i/n with 0 <= i < n"):
        parse_shard(bad)
    assert main(["activations", f"run={tmp_path}", f"activations.shard={bad}"]) == 2
    err = capsys.readouterr().err
    assert "shard" in err and "i/n" in err, err


def test_merge_names_missing_shards(runs, capsys):
    _, merged = runs
    assert main(["activations_merge", f"run={merged.parent}", "activations.shards=4", *COMMON]) == 2
    err = capsys.readouterr().err
    assert "4 of 4 shards missing" in err and "0-of-4/state.npz" in err and "3-of-4/state.npz" in err


def test_merge_refuses_a_shard_with_other_settings(runs, capsys):
    _, merged = runs
    assert main(["activations_merge", f"run={merged.parent}", "activations.shards=3", "data.limit=100",
                 "data.batch_size=16", "activations.top_k=4"]) == 2
    assert "top_k" in capsys.readouterr().err
