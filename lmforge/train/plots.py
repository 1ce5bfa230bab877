"""Curves of ``metrics.jsonl`` against step: ``loss.png`` (train and validation loss), GRPO's ``reward.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.artifacts import atomic_path


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "loss") -> None:
    plot_curves(metrics_path, out_png, title, ("loss", "train"), ("val_loss", "validation"),
                "cross-entropy (nats/token)")


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str, train: tuple[str, str],
                val: tuple[str, str], ylabel: str) -> None:
    """One metric of ``metrics.jsonl`` against step: ``train`` and ``val`` are (key, legend label) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list] = {train[0]: [], val[0]: []}
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        for key, pts in points.items():
            if key in rec:
                pts.append((rec["step"], rec[key]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if points[train[0]]:
        ax.plot(*zip(*points[train[0]]), label=train[1], linewidth=1)
    if points[val[0]]:
        ax.plot(*zip(*points[val[0]]), "o-", label=val[1], linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
