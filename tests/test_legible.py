"""The readability checks every report figure passes: each fires on a figure made to fail it and stays silent on a
clean one (seaborn's own default figures included, so the checks do not cry wolf)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from probe.pipeline.report.legible import problems  # noqa: E402


def _check(fig) -> list[str]:
    try:
        return problems(fig)
    finally:
        plt.close(fig)


def test_two_texts_overlap_exactly_when_their_boxes_do():
    """A second copy of a label, shifted by half its measured width, overlaps it; shifted by its width plus a gap,
    it does not (geometry of the measured width, not the checker's own arithmetic)."""
    fig = plt.figure(figsize=(6, 2), dpi=100)
    t = fig.text(0.1, 0.5, "overlapping label", fontsize=12)
    fig.canvas.draw()
    width = t.get_window_extent(fig.canvas.get_renderer()).width / (6 * 100)  # in figure fractions
    fig.text(0.1 + width / 2, 0.5, "overlapping label", fontsize=12)
    found = _check(fig)
    assert len(found) == 1 and "overlap" in found[0]

    fig = plt.figure(figsize=(6, 2), dpi=100)
    t = fig.text(0.1, 0.5, "overlapping label", fontsize=12)
    fig.canvas.draw()
    width = t.get_window_extent(fig.canvas.get_renderer()).width / (6 * 100)
    fig.text(0.1 + width + 0.02, 0.5, "overlapping label", fontsize=12)
    assert _check(fig) == []


def test_crowded_tick_labels_are_found_and_sparse_ones_pass():
    fig, ax = plt.subplots(figsize=(1.6, 1.6))
    ax.plot([-1e4, 1e4], [0, 1])
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xticks([-1e4, -1e3, -1e2, -10, -1, 0, 1, 10, 1e2, 1e3, 1e4])
    assert any("x tick label" in p for p in _check(fig))

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot([-1e4, 1e4], [0, 1])
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xticks([-1e3, 0, 1e3])
    assert _check(fig) == []

    fig, ax = plt.subplots(figsize=(3, 2))  # long category names side by side
    ax.bar(["features.10 of the network", "features.12 of the network", "features.14 of the network"], [1, 2, 3])
    assert any("x tick label" in p for p in _check(fig))


def test_undefined_values_are_found():
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0, np.nan, 1])
    assert any("undefined" in p for p in _check(fig))

    fig, ax = plt.subplots()
    ax.scatter([0, 1, 2], [0, np.inf, 1])
    assert any("scatter has 1 undefined" in p for p in _check(fig))

    fig, ax = plt.subplots()
    ax.imshow(np.array([[0.0, np.nan], [1.0, 2.0]]))  # matplotlib masks the cell: blank, not a drawn value
    assert _check(fig) == []


def test_values_outside_the_stated_range_are_found_and_axes_lines_are_not_data():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 2])
    ax.set_ylim(0, 1)
    assert any("outside" in p for p in _check(fig))

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.axhline(5)  # in axes coordinates along x: a reference line, not data
    ax.set_ylim(0, 1)
    assert _check(fig) == []


def test_seaborn_figures_of_clean_data_pass():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"depth": np.repeat(np.linspace(0, 1, 5), 20), "value": rng.random(100),
                       "run": np.tile(["a", "b"], 50)})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.lineplot(df, x="depth", y="value", hue="run", marker="o", ax=ax)
    assert _check(fig) == []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.boxplot(df.assign(layer=df["depth"].map(lambda d: f"conv{int(d * 4)}")), x="layer", y="value", hue="run", ax=ax)
    assert _check(fig) == []
