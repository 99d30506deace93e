"""The report: every page for complete runs, self-contained, linked, escaped, deterministic, and fine in a browser."""

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from probe.pipeline.cli import main
from probe.pipeline.stages import STAGES
from repo_copy import report_files, report_pages

# the index's sections, a run page's, a layer page's, then those of each stage's folder
SECTIONS = ["findings", "training", "runs", "analyses", "run", "layers", "place", "population", "units", "atlas",
            *(sid for s in STAGES.values() for sid in s.sections)]


class Page(HTMLParser):
    def __init__(self, html: str):
        super().__init__()
        self.ids, self.imgs, self.links, self.resources, self.scripts = [], [], [], [], 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.scripts += 1
        for key in ("src", "href"):
            if key in a and re.match(r"(https?:)?//|data:|javascript:", a[key] or ""):
                self.resources.append(a[key])


def _report(tmp_path, *args) -> tuple[dict[str, str], dict]:
    assert main(["report", *args, f"out_dir={tmp_path / 'reports'}", "name=t"]) == 0
    folder = tmp_path / "reports" / "t"
    return report_pages(folder), json.loads((folder / "report.json").read_text())


def check_site(folder: Path) -> dict[str, Page]:
    """Every page parses; every image is a file of the folder that decodes; every link resolves to a page of the
    folder and, with a fragment, to an id on it; nothing is fetched from elsewhere and no page runs a script."""
    pages = {rel: Page(html) for rel, html in report_pages(folder).items()}
    for rel, page in pages.items():
        assert page.resources == [] and page.scripts == 0, rel
        for src in page.imgs:
            path = folder / src
            assert path.is_file() and path.resolve().is_relative_to(folder.resolve()), (rel, src)
            with Image.open(path) as im:
                im.verify()
        for href in page.links:
            target, _, frag = href.partition("#")
            target = target or rel
            assert target in pages, (rel, href)
            assert not frag or frag in pages[target].ids, (rel, href)
    return pages


@pytest.mark.slow
def test_complete_runs_give_every_page_linked_with_valid_images(complete_runs, tmp_path):
    html, numbers = _report(tmp_path, f"runs=[{complete_runs[0]},{complete_runs[1]}]")
    folder = tmp_path / "reports" / "t"
    pages = check_site(folder)
    ids = {i for p in pages.values() for i in p.ids}
    for sid in SECTIONS:
        assert sid in ids, sid
    assert not any("Missing for" in h for h in html.values())
    assert sum(len(p.imgs) for p in pages.values()) >= 40
    # a page per run, per analysed layer and an atlas of every layer's units
    stats = __import__("pandas").read_parquet(complete_runs[0] / "activations" / "stats.parquet")
    for layer in stats["layer"].unique():
        atlas = next(r for r in pages if r.startswith("atlas-tiny_a-") and r.endswith(f"-{layer}.html"))
        units = stats[stats["layer"] == layer]["channel"]
        assert {f"unit-{u}" for u in units} <= set(pages[atlas].ids), layer
    assert sorted(numbers["pages"]) == sorted(pages)
    assert [r["label"] for r in numbers["runs"]] == ["tiny_a", "tiny_b"]
    assert numbers["differing_keys"] == ["seed"]
    # the same-model runs that differ in seed are aggregated
    assert "sweeps" in ids
    assert (folder / "findings.md").read_text().startswith("| run |")


@pytest.mark.slow
def test_same_inputs_give_identical_bytes(complete_runs, tmp_path):
    _report(tmp_path / "a", f"runs=[{complete_runs[0]}]")
    _report(tmp_path / "b", f"runs=[{complete_runs[0]}]")
    a, b = (report_files(tmp_path / x / "reports" / "t") for x in "ab")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


@pytest.mark.slow
def test_missing_artefacts_are_named_with_the_command(complete_runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(complete_runs[0], bare)
    shutil.rmtree(bare / "saliency")
    html, numbers = _report(tmp_path, f"runs=[{bare}]")
    assert "saliency" in numbers["missing"]
    assert f"probe saliency run={bare}" in html["saliency.html"]
    assert "filters" not in numbers["missing"]


@pytest.mark.slow
def test_markup_in_names_and_config_is_escaped(complete_runs, tmp_path):
    evil = tmp_path / "<script>alert(1)"  # a folder name is the run's label (no "/" in a folder name)
    shutil.copytree(complete_runs[0], evil)
    card = json.loads((evil / "card.json").read_text())
    card["run_name"] = "<script>alert(1)</script>"
    card["data"]["name"] = "<img src=x onerror=alert(2)>"
    card["data"]["classes"] = ["<b onclick=alert(3)>"] + card["data"]["classes"][1:]
    (evil / "card.json").write_text(json.dumps(card))
    html, _ = _report(tmp_path, f"runs=['{evil}',{complete_runs[1]}]")
    every = "".join(html.values())
    assert "<script>" not in every and "<img src=x" not in every and "<b onclick" not in every
    assert "&lt;script&gt;alert(1)" in html["index.html"] and "&lt;img src=x onerror=alert(2)&gt;" in every
    assert "&lt;b onclick=alert(3)&gt;" in every  # class names on the atlas and run pages, escaped
    assert all("<" not in name and ">" not in name for name in html)  # page names are slugs
    check_site(tmp_path / "reports" / "t")


def test_no_runs_and_bad_run_dirs_exit_2(tmp_path, capsys):
    assert main(["report", f"out_dir={tmp_path}"]) == 2
    assert "runs:" in capsys.readouterr().err
    assert main(["report", f"runs=[{tmp_path / 'nope'}]", f"out_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()


@pytest.mark.slow
def test_a_sweep_of_two_models_and_two_seeds_is_aggregated(tmp_path):
    sweep = tmp_path / "sweep"
    code = main(["train", "-m", "model=tiny_cnn,resnet_small", "seed=0,1", "data.image_size=16", "train.epochs=1",
                 "progress=false", f"hydra.sweep.dir={sweep}"])
    assert code == 0
    run_dirs = sorted(p.parent for p in sweep.rglob("card.json"))
    assert len(run_dirs) == 4 and len({p.name for p in run_dirs}) == 4  # a folder of its own per job
    for d in run_dirs:
        assert (d / "model.safetensors").is_file() and (d / "metrics.json").is_file()
    html, numbers = _report(tmp_path, f"sweep={sweep}")
    agg = numbers["tables"]["sweeps"][0]
    assert agg["columns"][:4] == ["experiment", "n", "runs", "varied"]
    assert sorted(r[0].split(",")[0] for r in agg["rows"]) == ["resnet_small", "tiny_cnn"]
    assert all(r[1] == "2" and r[3] == "seed" for r in agg["rows"])


@pytest.mark.slow
def test_every_figure_of_the_report_is_legible(complete_runs, caplog):
    """No figure has overlapping texts, an undefined value drawn or a value outside its axes
    (probe.pipeline.report.legible, which figure_uri runs on every figure and logs)."""
    from probe.pipeline.report.config import ReportStage
    from probe.pipeline.report.stage import render

    with caplog.at_level("WARNING", logger="probe.pipeline.report.figures"):
        files, _ = render(ReportStage(runs=[str(complete_runs[0]), str(complete_runs[1])]))
    assert [r.getMessage() for r in caplog.records if r.name == "probe.pipeline.report.figures"] == []
    assert sum(k.startswith("img/") for k in files) >= 40


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_in_headless_chromium(complete_runs, tmp_path):
    """Every page at 1400 and 800 px: no console error, no failed or outside request, no broken image, no page wider
    than the window; and with JavaScript off every page still shows its content and images."""
    if _chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    _report(tmp_path, f"runs=[{complete_runs[0]},{complete_runs[1]}]")
    folder = (tmp_path / "reports" / "t").resolve()
    pages = sorted(folder.glob("*.html"))
    problems, seen = [], 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        for width, js in ((1400, True), (800, True), (1400, False)):
            context = browser.new_context(viewport={"width": width, "height": 900}, java_script_enabled=js)
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on("request", lambda r: None if r.url.startswith(folder.as_uri()) else problems.append(f"outside: {r.url}"))
            for path in pages:
                page.goto(path.as_uri(), wait_until="load")
                if js:
                    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
                    wide = page.evaluate("document.documentElement.scrollWidth > window.innerWidth + 1")
                    seen += page.evaluate("document.images.length")
                    problems += [f"{path.name} at {width}px: {broken} broken images"] * bool(broken)
                    problems += [f"{path.name} at {width}px: wider than the window"] * bool(wide)
                else:
                    assert page.inner_text("main").strip(), path.name
                if path.name == "index.html" and width == 1400 and js:
                    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
            context.close()
        browser.close()
    assert problems == []
    assert seen >= 40
    assert Image.open(tmp_path / "index.png").size[0] == 1400


# Fast tests on hand-made run dirs: only the files each section reads ------------------------------------------

import math  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from probe.pipeline.report import claims as C  # noqa: E402
from probe.pipeline.report import ranking, sections  # noqa: E402
from probe.pipeline.report.collect import headline, load_runs, seed_groups  # noqa: E402
from probe.uncertainty import Comparison, paired_comparison, proportion_interval  # noqa: E402

LAYERS = [{"name": "conv1", "type": "Conv2d", "output_shape": [4, 8, 8], "params": 40},
          {"name": "relu1", "type": "ReLU", "output_shape": [4, 8, 8], "params": 0}]


def _run_dir(root, name, *, model="lenet5", dataset="digits", epochs=20, seed=0, lr=0.001, test_acc=0.9,
             stage_metrics=None):
    """A run dir with card.json, config.yaml and the given ``stage -> metrics.json`` (no weights)."""
    d = root / name
    d.mkdir(parents=True)
    card = {"card_version": 1, "run_name": name, "seed": seed, "params_total": 40, "layers": LAYERS,
            "model": {"name": model, "weights": None}, "train": {"epochs": epochs, "lr": lr},
            "data": {"name": dataset, "image_size": 8},
            "metrics": {"epochs": epochs, "test_acc": test_acc}}
    (d / "card.json").write_text(json.dumps(card))
    (d / "config.yaml").write_text(
        f"data:\n  name: {dataset}\n  image_size: 8\n  num_workers: 0\nmodel:\n  name: {model}\n"
        f"train:\n  epochs: {epochs}\n  lr: {lr}\nseed: {seed}\ndevice: auto\nrun_dir: {d}\n")
    for stage, m in (stage_metrics or {}).items():
        (d / stage).mkdir()
        (d / stage / "metrics.json").write_text(json.dumps(m))
    return d


def _cmp(effect, low, high, p, n=10, p_adjusted=None):
    return Comparison(effect, low, high, p, n, "sign-flip permutation", p_adjusted=p_adjusted).to_dict()


def test_formatters_write_the_interval_and_p_of_an_independent_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 0.05, 16), rng.normal(0.7, 0.05, 16)
    c = paired_comparison(a, b).to_dict()
    d = a - b
    half = stats.t.ppf(0.975, 15) * d.std(ddof=1) / math.sqrt(16)  # textbook t interval, computed here
    text = C.fmt_comparison(c)
    dec = 1 - math.floor(math.log10(half))  # two significant digits of the half-width
    assert text == (f"{d.mean():.{dec}f} [{d.mean() - half:.{dec}f}, {d.mean() + half:.{dec}f}], "
                    f"p < 0.001, n = 16").replace("-", "\u2212")  # every sign of these 16 pairs is -: p = 2 / 2^16
    # Wilson's interval for 3 of 10 is [0.108, 0.603] (Brown, Cai & DasGupta 2001, table of examples)
    assert C.fmt_estimate(proportion_interval(3, 10).to_dict()) == "0.30 [0.11, 0.60], n = 10"
    assert C.fmt_comparison({**c, "p_adjusted": 0.0312}).endswith("p = 0.031 (Holm), n = 16")
    assert C.fmt_comparison(None) == "not tested"
    assert C.fmt_estimate({"value": 0.5, "low": None, "high": None, "n": 1}) == "0.5 [interval undefined], n = 1"


def test_verdicts_follow_the_adjusted_p_and_the_sign():
    good = _cmp(-0.4, -0.5, -0.3, 0.001, p_adjusted=0.004)
    assert C.verdict(good, "beats random", "worse than random", "not distinguishable", sign=-1) == "beats random"
    assert C.verdict(good, "beats random", "worse than random", "not distinguishable", sign=1) == "worse than random"
    # significant alone, not after Holm: not distinguishable
    weak = _cmp(-0.4, -0.5, -0.3, 0.01, p_adjusted=0.2)
    assert C.verdict(weak, "beats random", "worse", "not distinguishable", sign=-1) == "not distinguishable"


def _saliency_run(root, name, true_del, true_ins, target="logit"):
    """saliency/metrics.parquet with true-class rows and extra predicted-class rows that would change any mean
    taken over all rows; metrics.json holds the true-class means and comparisons."""
    rows = []
    for method, (dl, ins) in {"saliency": (true_del, true_ins), "occlusion": (true_del - 0.2, true_ins + 0.2)}.items():
        for i in range(10):
            rows.append({"method": method, "item": i, "image": i, "target_kind": "true", "deletion_auc": dl + 0.01 * i,
                         "insertion_auc": ins - 0.01 * i, "deletion_auc_random": 0.5, "insertion_auc_random": 0.5})
        for i in range(3):  # misclassified images: predicted-class rows, far from the true-class ones
            rows.append({"method": method, "item": 10 + i, "image": i, "target_kind": "predicted", "deletion_auc": 0.99,
                         "insertion_auc": 0.01, "deletion_auc_random": 0.5, "insertion_auc_random": 0.5})
    df = pd.DataFrame(rows)
    metrics = {"target": target, "gradcam_layer": "relu1"}
    for method, g in df[df.target_kind == "true"].groupby("method"):
        metrics[method] = {k: float(g[k].mean()) for k in ("deletion_auc", "insertion_auc", "deletion_auc_random",
                                                              "insertion_auc_random")}
    metrics["saliency"]["deletion_vs_random"] = _cmp(-0.2, -0.3, -0.1, 0.002, p_adjusted=0.008)
    metrics["saliency"]["insertion_vs_random"] = _cmp(0.01, -0.05, 0.07, 0.6, p_adjusted=1.0)
    metrics["occlusion"]["deletion_vs_random"] = _cmp(-0.4, -0.5, -0.3, 0.002, p_adjusted=0.008)
    metrics["occlusion"]["insertion_vs_random"] = _cmp(-0.2, -0.3, -0.1, 0.002, p_adjusted=0.008)
    d = _run_dir(root, name, stage_metrics={"saliency": metrics})
    df.to_parquet(d / "saliency" / "metrics.parquet", index=False)
    return d, df


def test_saliency_table_is_metrics_json_of_the_true_class_rows_with_its_comparisons(tmp_path):
    d, df = _saliency_run(tmp_path, "trained", 0.3, 0.7)
    pages, numbers = _report(tmp_path, f"runs=[{d}]")
    html = pages["saliency.html"]
    deletion, insertion = numbers["tables"]["saliency"][:2]
    assert deletion["caption"].startswith("Deletion AUC") and insertion["caption"].startswith("Insertion AUC")
    rows = {r[1]: dict(zip(deletion["columns"], r)) for r in deletion["rows"]}
    ins = {r[1]: dict(zip(insertion["columns"], r)) for r in insertion["rows"]}
    true = df[df.target_kind == "true"].groupby("method")["deletion_auc"].mean()  # the definition, recomputed here
    every = df.groupby("method")["deletion_auc"].mean()  # the old, wrong average over all rows
    for method in ("saliency", "occlusion"):
        shown = float(rows[method]["deletion AUC"])
        assert shown == pytest.approx(true[method], abs=1e-3) and abs(shown - every[method]) > 0.05
    assert rows["saliency"]["verdict"] == "beats random"
    assert ins["saliency"]["verdict"] == "not distinguishable from random"
    assert ins["occlusion"]["verdict"] == "worse than random"
    assert rows["saliency"]["method − random [95% CI], p"] == "\u22120.20 [\u22120.30, \u22120.10], p = 0.008 (Holm), n = 10"
    assert "True" not in json.dumps(deletion["rows"]) and "False" not in json.dumps(insertion["rows"])
    assert "the logit (pre-softmax score) of the true class" in html and "Grad-CAM on relu1" in html
    stated = {(c["subject"], c["statement"]): c for c in numbers["claims"] if c["section"] == "saliency"}
    c = stated[("saliency insertion AUC against random pixel orders", "not distinguishable from random")]
    assert c["stat"]["p_adjusted"] == 1.0 and c["stat"]["low"] == -0.05
    assert "not distinguishable from random" in html and "p = 0.008 (Holm)" in html


def test_sweep_of_two_seeds_and_an_untrained_run_aggregates_only_the_seeds(tmp_path):
    sal = lambda e: {"target": "logit", "saliency": {"deletion_auc": 0.3, "deletion_vs_random": _cmp(e, e - 0.1, e + 0.1, 0.01)}}
    a = _run_dir(tmp_path, "s0", seed=0, test_acc=0.95, stage_metrics={"saliency": sal(-0.30)})
    b = _run_dir(tmp_path, "s1", seed=1, test_acc=0.91, stage_metrics={"saliency": sal(-0.20)})
    u = _run_dir(tmp_path, "lenet5_random", seed=0, epochs=0, test_acc=0.1, stage_metrics={"saliency": sal(0.0)})
    other_data = _run_dir(tmp_path, "cifar", seed=1, dataset="cifar10", test_acc=0.5)
    other_lr = _run_dir(tmp_path, "lr", seed=1, lr=0.01, test_acc=0.3)
    runs = load_runs([a, b, u, other_data, other_lr])
    assert [[r.label for r in g] for g in seed_groups(runs)] == [["s0", "s1"], ["lenet5_random"], ["cifar"], ["lr"]]
    assert headline(runs[0])["saliency.saliency.deletion_vs_random"] == -0.30  # a Comparison counts as its effect
    s = sections.sweeps(runs, {})
    agg = {x["metric"]: x for x in s["aggregates"]}
    assert {x["runs"] == ["s0", "s1"] for x in s["aggregates"]} == {True}
    acc = agg["train.test_acc"]
    half = stats.t.ppf(0.975, 1) * np.std([0.95, 0.91], ddof=1) / math.sqrt(2)
    assert acc["n"] == 2 and acc["mean"] == pytest.approx(0.93) and acc["std"] == pytest.approx(np.std([0.95, 0.91], ddof=1))
    assert acc["interval"]["low"] == pytest.approx(0.93 - half) and acc["interval"]["high"] == pytest.approx(0.93 + half)
    assert agg["saliency.saliency.deletion_vs_random"]["mean"] == pytest.approx(-0.25)
    assert agg["saliency.saliency.deletion_auc"]["n"] == 2


def _ranking_table(effects: dict[str, tuple[float, float]], n=10):
    """Per-image deletion and insertion AUC: method -> (deletion mean, insertion mean), image noise shared."""
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.01, (n, 2))
    rows = [{"method": m, "image": i, "target_kind": "true", "deletion_auc": dl + noise[i, 0] + 0.001 * k * (i % 3),
             "insertion_auc": ins + noise[i, 1] - 0.001 * k * (i % 2)}
            for k, (m, (dl, ins)) in enumerate(effects.items()) for i in range(n)]
    return pd.DataFrame(rows)


def test_methods_are_ordered_only_where_every_metric_agrees():
    # a beats b on both metrics; c beats a on deletion but loses on insertion; d equals b up to noise
    df = _ranking_table({"a": (0.2, 0.8), "b": (0.5, 0.5), "c": (0.1, 0.6), "d": (0.5, 0.5)})
    values = ranking.per_image(df)
    assert set(values) == {"deletion", "insertion"}  # no ROAD columns: ROAD is not a metric here
    pairs = {(p.a, p.b): p for p in ranking.rank_pairs(values)}
    assert pairs[("a", "b")].verdict == "a more faithful than b: every metric agrees"
    assert pairs[("a", "c")].verdict.startswith("metrics disagree: insertion favours a; deletion favours c")
    assert pairs[("b", "d")].agreed == 0 and pairs[("b", "d")].verdict.startswith("no order")
    # every difference a - b has the same sign on all 10 images: the exact sign-flip p is 2 / 2^10, and Holm over
    # the 6 pairs of a metric multiplies the smallest by at most 6
    assert pairs[("a", "b")].tests["deletion"].p == pytest.approx(2 / 1024)
    assert pairs[("a", "b")].tests["deletion"].p_adjusted <= 6 * 2 / 1024
    assert ranking.total_order(["a", "b", "c", "d"], list(pairs.values())) is None
    strict = {(p.a, p.b): p for p in ranking.rank_pairs(ranking.per_image(
        _ranking_table({"x": (0.1, 0.9), "y": (0.3, 0.7), "z": (0.6, 0.4)})))}
    assert ranking.total_order(["x", "y", "z"], list(strict.values())) == ["x", "y", "z"]


def test_trained_against_untrained_states_each_difference_with_its_test(tmp_path):
    act = lambda k: {"dead_units": {"relu1": {"dead": k, "units": 40}}, "dead_fraction_layers": ["relu1"],
                     "sparsity": {"conv1": 0.5, "relu1": 0.5 + k / 100}}
    t = _run_dir(tmp_path, "lenet5", stage_metrics={"activations": act(2)})
    u = _run_dir(tmp_path, "lenet5_random", epochs=0, stage_metrics={"activations": act(20)})
    other = _run_dir(tmp_path, "vgg", model="vgg_small", stage_metrics={"activations": act(1)})
    runs = load_runs([t, u, other])
    assert [(a.label, b.label) for a, b in sections.baseline_pairs(runs)] == [("lenet5", "lenet5_random")]
    s = sections.baseline(runs)
    dead = next(c for c in s["claims"] if c["subject"].startswith("dead units"))
    assert dead["stat"]["effect"] == pytest.approx(2 / 40 - 20 / 40)
    p = stats.fisher_exact([[2, 38], [20, 20]]).pvalue  # independent: scipy's Fisher exact test
    assert dead["stat"]["p"] == pytest.approx(p) and dead["statement"] == "trained differs from random"
    assert dead["stat"]["p_adjusted"] >= dead["stat"]["p"]
    assert "2 of 40 vs 20 of 40 units in relu1" in json.dumps(s["blocks"])


def test_selectivity_plot_keeps_only_defined_values():
    df = pd.DataFrame({"selectivity": [0.0, 0.5, 1.0, np.nan, 3.2, -0.1, np.inf]})
    kept, outside = sections.defined_selectivity(df)
    assert kept["selectivity"].tolist() == [0.0, 0.5, 1.0] and outside == 2


def test_synthesis_reads_out_activation_at_mean_and_peak_with_wilson_intervals(tmp_path):
    est = lambda k, n: {**proportion_interval(k, n).to_dict(), "k": k}
    m = {"channel": {"conv1": {"channels": 6, "out_activates_mean": est(6, 6), "out_activates_peak": est(2, 6),
                               "median_margin_mean": 0.4,
                               "margin_peak": _cmp(-0.3, -0.6, 0.0, 0.2)},
                     "all": {"channels": 6, "out_activates_mean": est(6, 6)}}}
    d = _run_dir(tmp_path, "syn", stage_metrics={"synthesis": m})
    s = sections.synthesis(load_runs([d]))
    table = s["blocks"][0]
    row = dict(zip(table["columns"], table["rows"][0]))
    assert len(table["rows"]) == 1 and row["layer"] == "conv1"  # "all" is not a layer
    # Wilson for 2 of 6 (closed form, computed here)
    z = stats.norm.ppf(0.975)
    centre, half = (2 / 6 + z * z / 12) / (1 + z * z / 6), z * math.sqrt(2 / 6 * 4 / 6 / 6 + z * z / 144) / (1 + z * z / 6)
    assert row["out-activates (peak) [95% CI]"] == f"0.33 [{centre - half:.2f}, {centre + half:.2f}], n = 6"
    margins = dict(zip(s["blocks"][1]["columns"], s["blocks"][1]["rows"][0]))
    assert margins["mean margin (peak) [95% CI], p"].endswith("p = 0.20, n = 10")
    assert margins["verdict (peak)"] == "not distinguishable"
    assert {c["subject"] for c in s["claims"]} >= {"conv1: fraction of channels whose image out-activates the best "
                                                   "dataset image at the peak"}


def test_shift_survival_is_read_per_shift_with_its_counts_and_compared_with_the_untrained_run(tmp_path):
    est = lambda k, n: {**proportion_interval(k, n).to_dict(), "k": k}
    geo = lambda k: {"survival": {"shift1_x_zero": est(k, 50), "accuracy_clean": est(47, 50)}}
    t = _run_dir(tmp_path, "lenet5", stage_metrics={"geometry": geo(45)})
    u = _run_dir(tmp_path, "lenet5_random", epochs=0, stage_metrics={"geometry": geo(50)})
    runs = load_runs([t, u])
    assert list(sections.survival_estimates(runs[0])) == ["1 px along x, zero fill"]  # clean accuracy is no shift
    s = sections.baseline(runs)
    (c,) = [c for c in s["claims"] if "surviving" in c["subject"]]
    assert c["stat"]["effect"] == pytest.approx(45 / 50 - 1)
    assert c["stat"]["p"] == pytest.approx(stats.fisher_exact([[45, 5], [50, 0]]).pvalue)
    g = sections.geometry(runs, {})
    assert "45 of 50: 0.90" in json.dumps(g["blocks"]) and len(g["claims"]) == 2


@pytest.mark.parametrize("path", ["artifacts/lenet5", "multirun/train/2026-12-01_10-00-00/model=lenet5,seed=0",
                                  "/tmp/it's here/a b", 'x/"q"/y', "a\\b=c", 'a\\"b=', "end\\\\", "x=[1,2]\\"])
def test_missing_stage_hints_paste_back_to_the_same_run_dir(path):
    """The shell splits the hint and Hydra's own override parser reads the run dir back unchanged."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from probe.pipeline.report.collect import stage_command

    argv = shlex.split(stage_command("geometry", Path(path)))
    assert argv[:2] == ["probe", "geometry"]
    override = OverridesParser.create().parse_override(argv[2])
    assert override.key_or_group == "run" and override.value() == path


@pytest.mark.slow
def test_a_pasted_hint_runs_on_a_sweep_style_run_dir(complete_runs, tmp_path):
    import shlex

    from probe.pipeline.report.collect import stage_command

    run = tmp_path / "sweep" / "model=tiny_cnn,seed=0"
    shutil.copytree(complete_runs[0], run, ignore=shutil.ignore_patterns("geometry"))
    argv = shlex.split(stage_command("geometry", run))
    assert main([*argv[1:], "data.probe_per_class=1", "geometry.erf.noise_images=2"]) == 0
    assert (run / "geometry" / "metrics.json").is_file()


def test_findings_are_written_from_the_metrics_and_follow_them(tmp_path):
    """Change a number in a metrics file and the sentence changes with it (Wilson's interval recomputed here)."""
    from probe.pipeline.report import findings as F

    def confusion(correct: int) -> list[list[int]]:  # 2 classes, 50 test images each
        return [[correct, 50 - correct], [10, 40]]

    def sentences(runs):
        loaded = load_runs(runs)
        return [f["text"] for f in F.findings(loaded, [], {"batches": 4, "cka_last_conv": {"a~b": 0.9},
                                                           "cka_last_conv_se": {"a~b": 0.01}})]

    a = _run_dir(tmp_path, "a", seed=0)
    b = _run_dir(tmp_path, "b", seed=1)
    for d, correct in ((a, 45), (b, 30)):
        card = json.loads((d / "card.json").read_text())
        card["evaluation"] = {"split": "test", "confusion": confusion(correct)}
        (d / "card.json").write_text(json.dumps(card))
    first = sentences([a, b])
    acc = next(t for t in first if t.startswith("Test accuracy"))
    ea, eb = proportion_interval(85, 100), proportion_interval(70, 100)
    assert acc == (f"Test accuracy: a {C.fmt_estimate(ea.to_dict())}; b {C.fmt_estimate(eb.to_dict())} "
                   "(Wilson's 95% interval over the test images).")
    t = stats.t.ppf(0.975, 3)  # the seed band: CKA with its t interval on batches - 1 degrees of freedom
    band = next(x for x in first if x.startswith("Two seeds"))
    assert C.fmt_estimate({"value": 0.9, "low": 0.9 - t * 0.01, "high": 0.9 + t * 0.01, "n": 4}) in band
    card = json.loads((b / "card.json").read_text())
    card["evaluation"]["confusion"] = confusion(50)  # b now beats a
    (b / "card.json").write_text(json.dumps(card))
    acc2 = next(t for t in sentences([a, b]) if t.startswith("Test accuracy"))
    assert acc2.startswith(f"Test accuracy: b {C.fmt_estimate(proportion_interval(90, 100).to_dict())}; a ")
    assert acc2 != acc


def test_class_image_transfer_is_counted_over_pairs_of_distinct_trained_runs(tmp_path):
    """The transfer table and the pooled share, recounted here from the comparison's rows: an untrained run's images
    and its verdicts on others' images are shown but never pooled."""
    from probe.pipeline.report import findings as F

    rng = np.random.default_rng(1)
    runs = {"a": 20, "b": 20, "u": 0}
    verdicts, rows = {}, []
    for maker, epochs in runs.items():
        _run_dir(tmp_path, maker, epochs=epochs)
        for judge in runs:
            if judge != maker:
                rec = rng.random(10) < 0.7
                verdicts[maker, judge] = rec
                rows += [{"maker": maker, "judge": judge, "image": i, "class": i, "probability": 0.9 if r else 0.1,
                          "predicted": i if r else (i + 1) % 10, "recognised": bool(r)} for i, r in enumerate(rec)]
    comp = tmp_path / "comparisons"
    comp.mkdir()
    pd.DataFrame(rows).to_parquet(comp / "transfer.parquet", index=False)
    loaded = load_runs([tmp_path / n for n in runs])
    result = sections.transfer(loaded, str(comp))
    table, pooled, per_maker = result
    k = int(verdicts["a", "b"].sum() + verdicts["b", "a"].sum())
    assert pooled == proportion_interval(k, 20).to_dict()
    assert set(per_maker) == {"a", "b"} and per_maker["a"] == proportion_interval(int(verdicts["a", "b"].sum()), 10).to_dict()
    row = table.set_index("class images of").loc["u"]
    assert row["judged by a"] == f"{int(verdicts['u', 'a'].sum())} of 10 (p {0.1 + 0.8 * verdicts['u', 'a'].mean():.2f})"
    text = next(f["text"] for f in F.findings(loaded, [], None, result) if "recognise" in f["text"])
    assert text.startswith(f"The other trained runs recognise {k} of 20 of the trained runs' class images")
    empty, none, nobody = sections.transfer(loaded, None)  # no comparison: nothing to state
    assert empty.empty and none is None and nobody == {}


def test_concepts_shared_with_a_seed_and_with_the_untrained_twin_are_compared_and_stated(tmp_path):
    """Two seeds and an untrained twin: each trained run's share of concepts matched in the other seed against its
    share in the untrained run, Fisher's exact test with Holm over both (recomputed here with scipy), and the
    finding that quotes them; a run retrained since the comparison drops out of every pair."""
    from probe.pipeline.report import findings as F
    from probe.pipeline.report.concepts import concepts, matches, seed_versus_untrained
    from probe.pipeline.rundir import weights_digest

    runs = {"a": (0, 20), "b": (1, 20), "u": (0, 0)}
    for name, (seed, epochs) in runs.items():
        d = _run_dir(tmp_path, name, seed=seed, epochs=epochs, stage_metrics={"concepts": {
            "layer": "conv2", "k": 10, "channels": 16, "images": 100, "rows_seen": 10000, "rows_kept": 5000,
            "reconstruction_error": 0.1, "reconstruction_error_all": 0.12, "k_curve": {"2": 0.5, "10": 0.1},
            "stability": {**proportion_interval(9, 10).to_dict(), "k": 9, "threshold": 0.8}}})
        (d / "model.safetensors").write_bytes(name.encode())
    corr = {"a~b": [0.95] * 8 + [0.5] * 2, "a~u": [0.9] * 2 + [0.3] * 8, "b~u": [0.85] * 3 + [0.2] * 7}
    rows = [{"run_a": p.split("~")[0], "layer_a": "conv2", "run_b": p.split("~")[1], "layer_b": "conv2",
             "concept_a": i, "concept_b": i, "corr": c} for p, cs in corr.items() for i, c in enumerate(cs)]
    comp = tmp_path / "comparisons"
    comp.mkdir()
    pd.DataFrame(rows).to_parquet(comp / "concepts.parquet", index=False)
    shares = {p: {**proportion_interval(sum(c > 0.8 for c in cs), 10).to_dict(), "k": sum(c > 0.8 for c in cs)}
              for p, cs in corr.items()}
    (comp / "metrics.json").write_text(json.dumps({"weights_sha256": {n: weights_digest(tmp_path / n) for n in runs},
                                                   "concepts_matched": {"threshold": 0.8, **shares}}))
    loaded = load_runs([tmp_path / n for n in runs])
    found = seed_versus_untrained(loaded, shares)
    assert [(a.label, b.label, u.label) for a, b, u, _ in found] == [("a", "b", "u"), ("b", "a", "u")]
    p = [stats.fisher_exact([[8, 2], [k, 10 - k]]).pvalue for k in (2, 3)]
    holm = sorted(p)[0] * 2, max(sorted(p)[0] * 2, sorted(p)[1])
    assert found[0][3]["p_adjusted"] == pytest.approx(holm[int(p[0] > p[1])])
    assert found[0][3]["effect"] == pytest.approx(0.6) and found[1][3]["effect"] == pytest.approx(0.5)
    s = concepts(loaded, str(comp))
    shared = next(b for b in s["blocks"] if b["kind"] == "table" and b["caption"].startswith("Concepts shared"))
    assert [r[2].split(":")[0] for r in shared["rows"]] == ["8 of 10", "2 of 10", "3 of 10"]
    text = next(f["text"] for f in F.findings(loaded, [s], None) if f["text"].startswith("Concepts"))
    # stated for b, whose untrained twin u is not its own initialisation (u and a share seed 0)
    assert text.startswith("Concepts (CRAFT, b's conv2): 8 of 10 have a partner in the other seed a")
    assert "3 of 10 in the untrained u (" in text and "9 of 10 are found again in the other half" in text
    said = [b["text"] for b in s["blocks"] if b["kind"] == "text"]
    assert any(t.startswith("a shares 8 of 10") and "u (its own initial weights: the same seed)" in t for t in said)
    assert any(t.startswith("b shares 8 of 10") and "with its untrained twin u:" in t for t in said)
    (tmp_path / "b" / "model.safetensors").write_bytes(b"retrained")
    t, kept = matches(load_runs([tmp_path / n for n in runs]), str(comp))
    assert set(zip(t.run_a, t.run_b)) == {("a", "u")} and set(kept) == {"threshold", "a~u"}


def test_synthesis_tables_keep_their_rows_beside_the_image_grids(complete_runs):
    """The out-activation table has a row per run and layer of text and intervals (an image grid built in the same
    loop once replaced its rows), and the accentuations sit beside their exemplars."""
    s = sections.synthesis(load_runs(complete_runs))
    table = next(b for b in s["blocks"] if b.get("caption", "").startswith("Per layer: fraction of channels"))
    assert table["columns"][:2] == ["run", "layer"]
    runs = {Path(d).name for d in complete_runs}
    assert {row[0] for row in table["rows"]} == runs and all(isinstance(row[1], str) for row in table["rows"])
    acc = [b for b in s["blocks"] if "feature accentuation" in b.get("caption", "")]
    assert len(acc) == 2 and all(len(b["rows"]) % 2 == 0 for b in acc)  # an exemplar row, then its accentuation
