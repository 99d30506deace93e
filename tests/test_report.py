"""The report: every section for complete runs, self-contained, escaped, deterministic, and fine in a browser."""

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image

from probe.cli import main

SECTIONS = ["overview", "architecture", "filters", "feature-maps", "distributions", "saliency", "synthesis", "geometry"]
pytestmark = pytest.mark.slow


class Page(HTMLParser):
    def __init__(self, html: str):
        super().__init__()
        self.ids, self.imgs, self.resources, self.scripts = [], [], [], 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if key in a and re.match(r"(https?:)?//", a[key] or ""):
                self.resources.append(a[key])


def _report(tmp_path, *args) -> tuple[str, dict]:
    assert main(["report", *args, f"out_dir={tmp_path / 'reports'}", "name=t"]) == 0
    folder = tmp_path / "reports" / "t"
    return (folder / "index.html").read_text(), json.loads((folder / "report.json").read_text())


def test_complete_runs_give_every_section_with_valid_images(complete_runs, tmp_path):
    html, numbers = _report(tmp_path, f"runs=[{complete_runs[0]},{complete_runs[1]}]")
    page = Page(html)
    for sid in SECTIONS:
        assert sid in page.ids, sid
    assert "Missing for" not in html
    assert page.resources == [] and page.scripts == 0 and "http://" not in html and "https://" not in html
    assert len(page.imgs) >= 10
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert [r["label"] for r in numbers["runs"]] == ["tiny_a", "tiny_b"]
    assert numbers["differing_keys"] == ["seed"]
    # the same-model runs that differ in seed are aggregated
    assert "sweeps" in page.ids


def test_same_inputs_give_identical_bytes(complete_runs, tmp_path):
    a, _ = _report(tmp_path / "a", f"runs=[{complete_runs[0]}]")
    b, _ = _report(tmp_path / "b", f"runs=[{complete_runs[0]}]")
    assert a == b


def test_missing_artefacts_are_named_with_the_command(complete_runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(complete_runs[0], bare)
    shutil.rmtree(bare / "saliency")
    html, numbers = _report(tmp_path, f"runs=[{bare}]")
    assert "saliency" in numbers["missing"]
    assert f"probe saliency run={bare}" in html
    assert "filters" not in numbers["missing"]


def test_markup_in_names_and_config_is_escaped(complete_runs, tmp_path):
    evil = tmp_path / "<script>alert(1)</script>"
    shutil.copytree(complete_runs[0], evil)
    card = json.loads((evil / "card.json").read_text())
    card["run_name"] = "<script>alert(1)</script>"
    card["data"]["name"] = "<img src=x onerror=alert(2)>"
    (evil / "card.json").write_text(json.dumps(card))
    html, _ = _report(tmp_path, f"runs=['{evil}',{complete_runs[1]}]")
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_no_runs_and_bad_run_dirs_exit_2(tmp_path, capsys):
    assert main(["report", f"out_dir={tmp_path}"]) == 2
    assert "runs:" in capsys.readouterr().err
    assert main(["report", f"runs=[{tmp_path / 'nope'}]", f"out_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()


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
    assert agg["columns"][:4] == ["model", "dataset", "n", "swept"]
    assert sorted(r[0] for r in agg["rows"]) == ["resnet_small", "tiny_cnn"]
    assert all(r[2] == "2" and r[3] == "seed" for r in agg["rows"])
    assert "±" in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_in_headless_chromium(complete_runs, tmp_path):
    if _chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    _report(tmp_path, f"runs=[{complete_runs[0]},{complete_runs[1]}]")
    page_path = tmp_path / "reports" / "t" / "index.html"
    errors, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(page_path.as_uri())
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
        n_images = page.evaluate("document.images.length")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == [] and failed == []
    assert n_images >= 10 and broken == 0
    assert Image.open(tmp_path / "report.png").size[0] == 1400
