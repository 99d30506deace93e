"""Is a figure readable? The checks every report figure passes (``figure_uri`` runs them; the tests assert none fails).

- **No two texts overlap**: titles, axis labels, the tick labels matplotlib draws (those inside the view), legend
  entries and annotations of every axes of the figure, compared pairwise by their window extents, each shrunk by a
  pixel (touching is fine, a character over another is not).
- **No undefined value is drawn**: every vertex of a line, every point of a scatter, every filled area and every bar
  is finite (images need no check: matplotlib masks an undefined cell and leaves it blank).
- **No value lies outside the stated range**: a line's or scatter's data points lie inside the axes' limits (the
  limits a figure sets are its stated range; a point beyond them would be silently cut off). Lines drawn in axes
  coordinates (``axhline``) are not data and are not checked.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text

SHRINK = 1.0  # px taken off each side of a text's box before testing overlap


def _name(ax, i: int) -> str:
    t = ax.get_title() or ax.get_title(loc="left") or ax.get_ylabel()
    return f"axes '{t}'" if t else f"axes {i}"


def _texts(fig) -> list[tuple[str, Text]]:
    out = []
    for i, ax in enumerate(fig.axes):
        where = _name(ax, i)
        for axis, which in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            for tick in axis._update_ticks():  # the ticks matplotlib draws: those inside the view
                out += [(f"{where}: {which} tick label", tick.label1), (f"{where}: {which} tick label", tick.label2)]
            out.append((f"{where}: {which} label", axis.label))
        for loc in ("left", "center", "right"):
            out.append((f"{where}: title", {"left": ax._left_title, "center": ax.title, "right": ax._right_title}[loc]))
        out += [(f"{where}: text", t) for t in ax.texts]
        if ax.get_legend() is not None:
            out += [(f"{where}: legend", t) for t in ax.get_legend().get_texts()]
            out.append((f"{where}: legend title", ax.get_legend().get_title()))
    if fig._suptitle is not None:
        out.append(("figure title", fig._suptitle))
    out += [("figure text", t) for t in fig.texts if t is not fig._suptitle]
    for lg in fig.legends:
        out += [("figure legend", t) for t in lg.get_texts()]
    return [(w, t) for w, t in out if t.get_visible() and t.get_text().strip()]


def overlaps(fig) -> list[str]:
    renderer = fig.canvas.get_renderer()
    boxes = []
    for where, t in _texts(fig):
        b = t.get_window_extent(renderer)
        if b.width > 2 * SHRINK and b.height > 2 * SHRINK:
            boxes.append((where, t.get_text(), b.x0 + SHRINK, b.y0 + SHRINK, b.x1 - SHRINK, b.y1 - SHRINK))
    out = []
    for (wa, ta, *a), (wb, tb, *b) in combinations(boxes, 2):
        if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
            out.append(f"{wa} '{ta}' and {wb} '{tb}' overlap")
    return out


def _outside(ax, xy: np.ndarray) -> int:
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    tx, ty = 1e-9 * (x1 - x0), 1e-9 * (y1 - y0)
    return int(((xy[:, 0] < x0 - tx) | (xy[:, 0] > x1 + tx) | (xy[:, 1] < y0 - ty) | (xy[:, 1] > y1 + ty)).sum())


def values(fig) -> list[str]:
    out = []
    for i, ax in enumerate(fig.axes):
        where = _name(ax, i)
        for a in ax.get_children():
            if not a.get_visible():
                continue
            data = a.get_transform().contains_branch(ax.transData) if hasattr(a, "get_transform") else False
            if isinstance(a, Line2D) and data:
                xy = np.asarray(a.get_xydata(), float)
                what = f"line '{a.get_label()}'"
            elif isinstance(a, PathCollection) and a.get_offset_transform().contains_branch(ax.transData):
                xy = np.asarray(a.get_offsets(), float).reshape(-1, 2)
                what = "scatter"
            elif isinstance(a, PolyCollection):
                xy = np.concatenate([p.vertices for p in a.get_paths()]) if a.get_paths() else np.zeros((0, 2))
                if not np.isfinite(xy).all():
                    out.append(f"{where}: a filled area has undefined vertices")
                continue
            elif isinstance(a, Rectangle) and data:
                box = np.array([a.get_x(), a.get_y(), a.get_width(), a.get_height()], float)
                if not np.isfinite(box).all():
                    out.append(f"{where}: a bar is undefined")
                continue
            else:
                continue
            if len(xy) and not np.isfinite(xy).all():
                out.append(f"{where}: {what} has {int((~np.isfinite(xy).all(1)).sum())} undefined points")
            finite = xy[np.isfinite(xy).all(1)]
            if len(finite) and (n := _outside(ax, finite)):
                out.append(f"{where}: {what} has {n} points outside the axes' range")
    return out


def problems(fig) -> list[str]:
    """Every reason ``fig`` is not readable (empty: it is)."""
    fig.canvas.draw()
    return overlaps(fig) + values(fig)
