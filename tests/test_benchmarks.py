"""benchmarks/bench_gpu.py runs every section end to end, on the CPU at toy sizes (``smoke``): a session
that gets a GPU should not lose its minutes to a script that broke since the last one. Nothing is measured."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_gpu_benchmark_runs_every_section_in_smoke_mode():
    import bench_gpu

    r = bench_gpu.run("smoke")
    assert r["device"] == "cpu" and r["mode"] == "smoke"
    for section in ("inference", "saliency", "render"):
        assert "error" not in r[section], r[section]
    inf, sal, ren = r["inference"], r["saliency"], r["render"]
    # each ratio is the quotient of the figures it reports
    assert inf["stats_vs_plain_fast"] == pytest.approx(inf["stats_images_per_s"] / inf["plain_fast_images_per_s"])
    assert sal["vanilla_ratio"] == pytest.approx(sal["vanilla_s"] / sal["forward_backward_s"])
    assert sal["ig_ratio"] == pytest.approx(sal["ig_s"] / sal["forward_backward_x_steps_s"])
    assert ren["batched_speedup"] == pytest.approx(ren["one_at_a_time_s_per_channel"] / ren["batched_s_per_channel"])
    if "lucent_error" not in ren:  # Lucent is a benchmark-only extra
        assert ren["batched_vs_lucent"] == pytest.approx(ren["lucent_s_per_channel"] / ren["batched_s_per_channel"])


@pytest.mark.slow
def test_similarity_benchmark_runs_in_quick_mode():
    import bench_similarity

    r = bench_similarity.run(quick=True)
    for c in r["cases"].values():
        assert c["ratio"] == pytest.approx(c["compare_s"] / c["plain_s"])
        assert c["gram_precision"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fourier", "maco"])
def test_synthesis_benchmark_runs_for_both_parametrisations(kind):
    import bench_synthesis

    r = bench_synthesis.run(quick=True, channels=3, lucent_channels=1, steps=2, size=32, kind=kind)
    assert r["param"] == kind and r["batched"]["channels"] == 3
    one = r["one_at_a_time"]
    assert one["batched_speedup_wall"] == pytest.approx(one["wall_s_per_channel"] / r["batched"]["wall_s_per_channel"])


@pytest.mark.slow
def test_concepts_benchmark_runs_in_quick_mode():
    import bench_concepts

    r = bench_concepts.run(quick=True)
    assert r["quick"] and set(r["cases"]) == {"resnet_small", "resnet18_64px"}
    for c in r["cases"].values():
        assert c["layer"] == "layer3" and c["k"] == 4 and 0 < c["rows_kept"] <= min(c["rows_seen"], 2000)
        assert 0 <= c["reconstruction_error"] < 1
        # each ratio is the quotient of the figures it reports
        assert c["extraction_s"] == pytest.approx(c["sample_s"] + c["fit_s"] + c["transform_s"])
        assert c["ratio"] == pytest.approx(c["extraction_s"] / c["plain_s"])
        imp = c["importance"]
        assert imp["s_per_image"] == pytest.approx(imp["importance_s"] / imp["images"])
