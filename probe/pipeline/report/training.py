"""What a researcher looks at first: every run's training curves, its test accuracy per class with Wilson
intervals, and its confusion matrix (from ``train_log.csv`` and the card's ``evaluation``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from probe.pipeline.report.collect import RunData
from probe.pipeline.report.figures import figure_uri
from probe.uncertainty import proportion_interval


def curves(r: RunData) -> pd.DataFrame | None:
    """The run's ``train_log.csv`` (one row per epoch), None where it has none or no epoch."""
    path = r.path / "train_log.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df if len(df) and "epoch" in df else None


def confusion(r: RunData) -> np.ndarray | None:
    """Test-split counts, row = true class, column = predicted class (None for a card without them)."""
    ev = r.card.get("evaluation") or {}
    m = ev.get("confusion")
    return np.asarray(m, dtype=np.int64) if m else None


def classes(r: RunData) -> list[str]:
    names = r.card.get("data", {}).get("classes") or r.card.get("model", {}).get("classes")
    n = r.card.get("model", {}).get("num_classes") or (len(names) if names else 0)
    return [str(c) for c in names] if names else [str(i) for i in range(n)]


def outside(r: RunData) -> np.ndarray:
    """Per true class, the test images predicted as none of the data's classes (a pretrained head's other outputs)."""
    o = (r.card.get("evaluation") or {}).get("predicted_outside")
    m = confusion(r)
    return np.asarray(o, dtype=np.int64) if o else np.zeros(0 if m is None else len(m), dtype=np.int64)


def per_class(r: RunData) -> list[dict]:
    """Per class: name, k correct of n test images, Wilson's 95% interval of the accuracy."""
    m = confusion(r)
    if m is None:
        return []
    names = classes(r)
    other = outside(r)
    out = []
    for i, row in enumerate(m):
        n = int(row.sum() + other[i])
        out.append({"class": names[i] if i < len(names) else str(i), "k": int(m[i, i]), "n": n,
                    "accuracy": proportion_interval(int(m[i, i]), n).to_dict() if n else None})
    return out


def accuracy(r: RunData) -> dict | None:
    """Test accuracy as a Wilson Estimate (k of n from the confusion matrix)."""
    m = confusion(r)
    if m is None or m.sum() + outside(r).sum() == 0:
        return None
    return proportion_interval(int(np.trace(m)), int(m.sum() + outside(r).sum())).to_dict()


def curves_figure(runs: list[RunData], colours: dict):
    """Validation accuracy and training loss per epoch, one colour per run; None without any curve."""
    have = [(r, c) for r in runs if (c := curves(r)) is not None]
    if not have:
        return None
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 3.6))
    for r, c in have:
        acc.plot(c["epoch"], c["val_acc"], marker="o", ms=3, color=colours[r.label], label=f"{r.label} (validation)")
        acc.plot(c["epoch"], c["train_acc"], ls="--", color=colours[r.label], lw=1)
        loss.plot(c["epoch"], c["train_loss"], ls="--", color=colours[r.label], lw=1)
        loss.plot(c["epoch"], c["val_loss"], marker="o", ms=3, color=colours[r.label], label=r.label)
    acc.set_xlabel("epoch")
    acc.set_ylabel("accuracy")
    acc.set_ylim(0, 1.02)
    acc.set_title("Accuracy (solid: validation, dashed: training)")
    loss.set_xlabel("epoch")
    loss.set_ylabel("cross-entropy (nats)")
    loss.set_yscale("log")
    loss.set_title("Loss (solid: validation, dashed: training)")
    loss.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return figure_uri(fig)


def per_class_figure(runs: list[RunData], colours: dict):
    """Test accuracy per class with Wilson's 95% interval, runs side by side; None without confusion matrices."""
    have = [(r, p) for r in runs if (p := per_class(r))]
    if not have:
        return None
    names = [p["class"] for p in have[0][1]]
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * len(names) + 3), 3.6))
    width = 0.8 / len(have)
    for i, (r, rows) in enumerate(have):
        x = np.arange(len(rows)) - 0.4 + width * (i + 0.5)
        e = [row["accuracy"] or {"value": np.nan, "low": np.nan, "high": np.nan} for row in rows]
        v = np.array([d["value"] for d in e])
        ok = np.isfinite(v)
        ax.errorbar(x[ok], v[ok], yerr=[v[ok] - np.array([d["low"] for d in e])[ok],
                                        np.array([d["high"] for d in e])[ok] - v[ok]],
                    fmt="o", ms=4, capsize=2, color=colours[r.label], label=r.label)
    same = all([p["class"] for p in rows] == names for _, rows in have)
    ax.set_xticks(np.arange(len(names)), names if same else [str(i) for i in range(len(names))])
    ax.set_xlabel("class" if same else "class index")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Test accuracy per class, with Wilson's 95% interval")
    ax.legend(fontsize=8, loc="lower left", ncol=min(len(have), 3))
    fig.tight_layout()
    return figure_uri(fig)


def confusion_figure(r: RunData):
    """The run's confusion matrix: counts written in each cell, colour = share of the true class's images."""
    m = confusion(r)
    if m is None:
        return None
    names = classes(r)[: len(m)]
    share = m / np.maximum(m.sum(1, keepdims=True) + outside(r)[:, None], 1)
    side = 0.42 * len(m) + 1.6
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    if len(m) <= 20:
        for i in range(len(m)):
            for j in range(len(m)):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "#1d2330")
    ticks = np.arange(len(m)) if len(m) <= 20 else np.arange(0, len(m), max(1, len(m) // 10))
    ax.set_xticks(ticks, [names[t] for t in ticks], fontsize=8)
    ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    out = int(outside(r).sum())
    ax.set_title(f"{r.label}: confusion on the test split" + (f" ({out} predicted as none of these classes)" if out else ""),
                 fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return figure_uri(fig)
