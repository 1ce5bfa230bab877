"""A leaderboard across eval runs: one row per evaluated model, one column per task, plus the aggregate.

Rows come from the registry (finished ``eval`` runs; the newest run per model folder) and their ``results.json``;
the lineage gives each model's data (the data stage's folder and its switched-off filters), its parameter count and
the tokens it was trained on.  ``to_markdown`` / ``to_html`` render the same table.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import registry
from lmforge.model.hf import load_config


@dataclass
class Row:
    model: str
    path: str
    data: str = "-"
    params: int | None = None
    tokens: int | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    aggregate: float | None = None
    eval_path: str = ""


def _find(tree: dict[str, Any], stage: str) -> dict[str, Any] | None:
    if tree.get("stage") == stage:
        return tree
    for sub in tree.get("inputs", {}).values():
        found = _find(sub, stage)
        if found:
            return found
    return None


def _data_label(node: dict[str, Any] | None) -> str:
    if node is None:
        return "-"
    cfg = node.get("config", {})
    off = [k for k in ("gopher_repetition", "gopher_quality", "dedup") if cfg.get(k) is False]
    name = Path(node["path"]).parent.name + "/" + Path(node["path"]).name
    return name + (f" (no {', '.join(off)})" if off else "")


def collect(stage: str = "eval") -> list[Row]:
    """One row per model folder: its newest finished eval run that scored tasks."""
    rows: dict[str, Row] = {}
    for run in registry.list_runs(stage, limit=10_000):
        if run["status"] != "done":
            continue
        results_path = Path(run["path"]) / "results.json"
        if not results_path.exists():
            continue
        results = json.loads(results_path.read_text())
        if not results.get("tasks"):
            continue
        model = results["model"]
        if model in rows:  # list_runs is newest first
            continue
        tree = registry.lineage(run["path"])
        model_node = tree.get("inputs", {}).get("model", {})
        pretrain = _find(model_node, "pretrain") if not model_node.get("raw") else None
        try:
            params = load_config(model).num_params()
        except FileNotFoundError:
            params = None
        rows[model] = Row(model=Path(model).parent.name + "/" + Path(model).name, path=model,
                          data=_data_label(_find(model_node, "data")) if not model_node.get("raw") else "-",
                          params=params, tokens=(pretrain or {}).get("metrics", {}).get("tokens_trained"),
                          tasks=results["tasks"], aggregate=results.get("aggregate_centered"), eval_path=run["path"])
    return sorted(rows.values(), key=lambda r: -(r.aggregate if r.aggregate is not None else float("-inf")))


def _num(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: model, data, params, tokens, one column per task (score ± CI half-width), aggregate."""
    tasks = sorted({t for r in rows for t in r.tasks})
    metric = {t: next(r.tasks[t]["metric"] for r in rows if t in r.tasks) for t in tasks}
    header = ["model", "data", "params", "tokens"] + [f"{t} ({metric[t]})" for t in tasks] + ["aggregate"]
    cells = []
    for r in rows:
        line = [r.model, r.data, _num(r.params), _num(r.tokens)]
        for t in tasks:
            res = r.tasks.get(t)
            line.append("-" if res is None else f"{res['score']:.3f} ± {(res['ci'][1] - res['ci'][0]) / 2:.3f}")
        line.append("-" if r.aggregate is None else f"{r.aggregate:.3f}")
        cells.append(line)
    return header, cells


def to_markdown(rows: list[Row]) -> str:
    header, cells = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def to_html(rows: list[Row], title: str = "lmforge leaderboard") -> str:
    header, cells = table(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>score ± half-width of the 95% bootstrap CI; aggregate = mean "
            f"centred accuracy (acc − chance)/(1 − chance) over non-perplexity tasks.</p>"
            f"<table><tr>{th}</tr>{trs}</table></body></html>\n")
