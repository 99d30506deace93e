"""Benchmark: building the report of the default pipeline, and its size; screenshots of its pages for docs/.

Needs the default pipeline's outputs (``dvc repro``: artifacts/<run>/ and comparisons/default/). Times
``probe report``'s build (render and write, in this process, best of ``--rounds``) for every run of
artifacts/ with the comparison, and as the baseline in the same run the report of the first run alone: ``ratio`` =
all runs / one run. Targets (issue "the report as a product"): build within 60 s on the 2-core CPU, ``index.html``
under 1.5 MB, the whole folder under 40 MB (bytes of the files, not disk blocks).

Then it opens every page in headless Chromium at 1400 and 800 px (console errors, failed requests, broken images,
pages wider than the window). With ``--docs DIR`` it also writes 1400 px wide screenshots (the top 1600 px) of the findings page, a layer page and
an atlas page, in headless Chromium.

    python benchmarks/bench_report.py [--rounds 3] [--docs docs] [--out benchmarks/results/report.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"build_s": 60.0, "index_mb": 1.5, "folder_mb": 40.0}
SHOTS = {"report_overview.png": "index.html", "report_layer.png": "layer-lenet5-conv2.html",
         "report_atlas.png": "atlas-lenet5-conv2.html"}


def build(runs: list[Path], comparison: Path | None, out: Path, name: str) -> float:
    from probe.pipeline.report.config import ReportStage
    from probe.pipeline.report.stage import run

    t0 = time.perf_counter()
    run(ReportStage(runs=[str(r) for r in runs], comparison=str(comparison) if comparison else None,
                    out_dir=str(out), name=name))
    return time.perf_counter() - t0


def browser_check(folder: Path) -> dict:
    """Every page at 1400 and 800 px in headless Chromium: console errors, failed requests, broken images, pages
    wider than the window (the same checks as tests/test_report.py::test_report_in_headless_chromium)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    problems, pages = [], sorted(folder.resolve().glob("*.html"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        for width in (1400, 800):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            for path in pages:
                page.goto(path.as_uri(), wait_until="load")
                if page.evaluate("Array.from(document.images).some(i => !i.complete || i.naturalWidth === 0)"):
                    problems.append(f"{path.name} at {width}px: a broken image")
                if page.evaluate("document.documentElement.scrollWidth > window.innerWidth + 1"):
                    problems.append(f"{path.name} at {width}px: wider than the window")
            page.close()
        browser.close()
    return {"pages": len(pages), "widths": [1400, 800], "problems": problems}


def screenshots(folder: Path, docs: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        for png, html in SHOTS.items():
            if (folder / html).is_file():
                page.goto((folder / html).resolve().as_uri(), wait_until="load")
                page.screenshot(path=str(docs / png), clip={"x": 0, "y": 0, "width": 1400, "height": 1600})
                written.append(str(docs / png))
        browser.close()
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    runs = sorted(p.parent for p in (ROOT / "artifacts").glob("*/card.json"))
    comparison = ROOT / "comparisons" / "default"
    if not runs:
        print("no run dirs under artifacts/: run `dvc repro` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        all_s = min(build(runs, comparison, tmp / "all", "default") for _ in range(a.rounds))
        one_s = min(build(runs[:1], None, tmp / "one", "one") for _ in range(a.rounds))
        folder = tmp / "all" / "default"
        files = [p for p in folder.rglob("*") if p.is_file()]
        res = {"runs": len(runs), "build_s": round(all_s, 2), "one_run_build_s": round(one_s, 2),
               "ratio": round(all_s / one_s, 2), "pages": sum(p.suffix == ".html" for p in files),
               "images": sum(p.suffix == ".png" for p in files),
               "index_mb": round((folder / "index.html").stat().st_size / 1e6, 3),
               "folder_mb": round(sum(p.stat().st_size for p in files) / 1e6, 2)}
        res["targets"] = {k: {"target": v, "met": res[k] <= v} for k, v in TARGETS.items()}
        res["browser"] = browser_check(folder)
        if a.docs:
            res["screenshots"] = screenshots(folder, a.docs)
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
