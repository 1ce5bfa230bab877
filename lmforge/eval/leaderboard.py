"""A leaderboard across eval runs: one row per evaluated model, one column per task, plus the aggregate.

Rows come from the registry (finished ``eval`` runs; the newest run per model folder) and their ``results.json``;
the lineage gives each model's data (the data stage's folder and its switched-off filters), its parameter count and
the tokens it was trained on.  ``to_markdown`` / ``to_html`` render the same table.

The aggregate (mean centred accuracy) is comparable between rows only over the same tasks: ``collect`` recomputes it
over the *common* tasks, those every compared model ran with the same items (same ``n``, same few-shot setting), and
ranks by that.  Each row also shows how many of the scored tasks it ran; a row whose own task set differs from the
common one is marked ``*`` (its ``results.json`` aggregate covers other tasks).  With no common task there is no
aggregate and no ranking.
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
    aggregate: float | None = None  # mean centred score over the common tasks (``compare``)
    own_aggregate: float | None = None  # the eval run's own aggregate, over the tasks it ran
    eval_path: str = ""
    comparable: bool = True  # ran exactly the common scored tasks

    def scored(self) -> dict[str, tuple]:
        """Tasks with a centred score, each with what makes two runs of it comparable."""
        return {t: (r.get("n"), r.get("num_fewshot")) for t, r in self.tasks.items() if "centered" in r}


def common_tasks(rows: list[Row]) -> list[str]:
    """The scored tasks every row ran with the same number of items and few-shot setting."""
    if not rows:
        return []
    first = rows[0].scored()
    return sorted(t for t, key in first.items() if all(r.scored().get(t) == key for r in rows[1:]))


def compare(rows: list[Row]) -> list[Row]:
    """Set each row's ``aggregate`` over the common tasks and ``comparable``; rank by it (rows as given if none)."""
    common = common_tasks(rows)
    for r in rows:
        r.aggregate = sum(r.tasks[t]["centered"] for t in common) / len(common) if common else None
        r.comparable = set(r.scored()) == set(common)
    return sorted(rows, key=lambda r: -(r.aggregate if r.aggregate is not None else float("-inf")))


def all_scored(rows: list[Row]) -> list[str]:
    return sorted({t for r in rows for t in r.scored()})


def caption(rows: list[Row]) -> str:
    """What the aggregate means for these rows, and a warning when task sets differ."""
    common, scored = common_tasks(rows), all_scored(rows)
    if not common:
        return ("aggregate: none - no scored task was run by every model with the same items; rows are not ranked "
                "(evaluate the models on the same --tasks)")
    text = f"aggregate = mean centred accuracy over the {len(common)} task(s) every model ran, rows ranked by it"
    if len(common) < len(scored):
        left = [t for t in scored if t not in common]
        text += (f"; left out (not run by every model, or on other items): {', '.join(left)}; "
                 "* = the model's task set differs")
    return text


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
                          tasks=results["tasks"], own_aggregate=results.get("aggregate_centered"),
                          eval_path=run["path"])
    return compare(list(rows.values()))


def _num(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: model, data, params, tokens, one column per task (score ± CI half-width), the number of
    scored tasks the model ran, the aggregate over the common tasks."""
    tasks = sorted({t for r in rows for t in r.tasks})
    metric = {t: next(r.tasks[t]["metric"] for r in rows if t in r.tasks) for t in tasks}
    n_common, n_scored = len(common_tasks(rows)), len(all_scored(rows))
    header = (["model", "data", "params", "tokens"] + [f"{t} ({metric[t]})" for t in tasks]
              + ["tasks run", f"aggregate ({n_common} common)"])
    cells = []
    for r in rows:
        line = [r.model + ("" if r.comparable else " *"), r.data, _num(r.params), _num(r.tokens)]
        for t in tasks:
            res = r.tasks.get(t)
            line.append("-" if res is None else f"{res['score']:.3f} ± {(res['ci'][1] - res['ci'][0]) / 2:.3f}")
        line.append(f"{len(r.scored())}/{n_scored}")
        line.append("-" if r.aggregate is None else f"{r.aggregate:.3f}")
        cells.append(line)
    return header, cells


def to_markdown(rows: list[Row]) -> str:
    header, cells = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n\n" + caption(rows) + "\n"


def to_html(rows: list[Row], title: str = "lmforge leaderboard") -> str:
    header, cells = table(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>score ± half-width of the 95% bootstrap CI; centred accuracy = "
            f"(acc − chance)/(1 − chance); {html.escape(caption(rows))}.</p>"
            f"<table><tr>{th}</tr>{trs}</table></body></html>\n")
