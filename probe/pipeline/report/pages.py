"""The report as a folder of pages: ``index.html`` (findings first), a page per analysis, per run, per layer and an
atlas of every unit of every analysed layer. Sections build their images as PNG data URIs; :func:`write_site` moves
each into ``img/<digest>.png`` (named by its bytes, so the same inputs give the same folder and an image used twice
is stored once) and writes plain HTML files that link to each other with relative paths: no network, no script.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from probe.pipeline.report.claims import FILTERS

DATA_URI = "data:image/png;base64,"


def slug(text: str) -> str:
    """A file-name-safe form of a run label or layer name (letters, digits, ``_ . -``)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "x"
    return s[:80]


def unique_slugs(names: list[str]) -> dict[str, str]:
    """name -> slug, made unique with a numeric suffix where two names slug alike."""
    out, used = {}, set()
    for n in names:
        s, i = slug(n), 2
        while s.lower() in used:
            s, i = f"{slug(n)}-{i}", i + 1
        used.add(s.lower())
        out[n] = s
    return out


def page(path: str, title: str, sections: list[dict], reading: bool = False) -> dict:
    return {"path": path, "title": title, "sections": [s for s in sections if s is not None], "reading": reading}


def _externalise(value, assets: dict[str, bytes]):
    """``value`` with every PNG data URI replaced by ``img/<digest>.png`` (bytes collected in ``assets``)."""
    if isinstance(value, str) and value.startswith(DATA_URI):
        data = base64.b64decode(value[len(DATA_URI):])
        name = f"img/{hashlib.sha256(data).hexdigest()[:20]}.png"
        assets[name] = data
        return name
    if isinstance(value, dict):
        return {k: _externalise(v, assets) for k, v in value.items()}
    if isinstance(value, list):
        return [_externalise(v, assets) for v in value]
    return value


def render_site(name: str, pages: list[dict], runs: list[dict], analyses: list[dict]) -> dict[str, bytes]:
    """Relative path -> bytes of every file of the report (pages and images)."""
    env = Environment(loader=PackageLoader("probe.pipeline.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    template = env.get_template("page.html.j2")
    assets: dict[str, bytes] = {}
    files = {}
    for p in pages:
        p = _externalise(p, assets)
        files[p["path"]] = template.render(name=name, page=p, runs=runs, analyses=analyses).encode()
    return files | dict(sorted(assets.items()))


def write_site(folder: Path, files: dict[str, bytes]) -> None:
    """Every file into ``folder``: a staged folder (:func:`probe.pipeline.rundir.staged_dir`), renamed into place
    whole, so a plain write per file suffices (no fsync per image)."""
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
