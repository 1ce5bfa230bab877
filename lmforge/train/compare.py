"""``lmforge train compare RUN...``: overlay several runs' loss curves (train and validation) in one PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.artifacts import atomic_path


def read_curves(run_dir: str | os.PathLike) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, validation)`` as ``(tokens seen, loss)`` points from a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a pretraining run folder?")
    train, val = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        x = rec.get("tokens", rec["step"])
        if "loss" in rec:
            train.append((x, rec["loss"]))
        if "val_loss" in rec:
            val.append((x, rec["val_loss"]))
    return train, val


def compare_runs(runs: list[str | os.PathLike], out_png: str | os.PathLike, labels: list[str] | None = None,
                 title: str = "loss vs tokens") -> Path:
    """Write one PNG with every run's train curve (thin line) and validation points (markers), same colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("give at least one run folder to compare")
    labels = labels or [Path(r).name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (run, label) in enumerate(zip(runs, labels)):
        train, val = read_curves(run)
        colour = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=1, alpha=0.7, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o-", color=colour, linewidth=1.5, label=f"{label} val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_png)
