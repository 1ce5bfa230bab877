"""Data and evaluation views: a data run's ``stats.json`` and documents (``lmforge data inspect`` in the browser), and
the eval leaderboard with per-item results."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

from lmforge.dashboard.store import Store

CHART_KEYS = (("length", "kept documents by length (characters)"), ("lang", "kept documents by language"),
              ("lang_score", "kept documents by language score"), ("quality", "kept documents by quality"),
              ("domain", "kept documents by domain"))


def load_stats(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = folder / "stats.json"
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path} is missing: the data run has not finished (or this is not a data run)"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{path} is corrupt: {err}"
    if not isinstance(stats, dict) or not isinstance(stats.get("steps"), list):
        return None, f"{path} has no per-step counts (not a data stage stats.json)"
    for st in stats["steps"]:
        st["dropped_total"] = sum((st.get("dropped") or {}).values())
        st["conserved"] = st.get("in") == st.get("kept", 0) + st["dropped_total"]
    return stats, None


def charts(stats: dict[str, Any] | None) -> list[str]:
    """Inline-SVG bar charts of the kept documents (the data report's own renderer)."""
    if not stats:
        return []
    from lmforge.data.report import _BIN_ORDER, _sorted_bins, bars

    profile = stats.get("profile") or {}
    out = []
    for key, label in CHART_KEYS:
        counts = profile.get(key)
        if isinstance(counts, dict) and counts:
            try:
                counts = _sorted_bins(counts) if key in _BIN_ORDER else counts
            except ValueError:
                pass
            out.append(bars(counts, label, sort_by_count=key not in _BIN_ORDER))
    for st in stats.get("steps", []):
        for table, counts in (st.get("tallies") or {}).items():
            if isinstance(counts, dict) and counts:
                out.append(bars(counts, f"{st.get('name')}: {table}", sort_by_count=table != "cluster_size"))
    return [c for c in out if c]


def browse(folder: Path, dropped: bool, field: str, value: str, text: str, n: int,
           skip: int) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Up to ``n`` documents (after ``skip`` matches) whose ``field`` equals ``value`` and whose text contains
    ``text``: ``(docs, problem, more)``."""
    from lmforge.data.peek import MISSING, get_field, iter_shard

    n = min(max(n, 1), 200)
    skip = max(skip, 0)

    def match(rec: dict[str, Any]) -> bool:
        if field:
            got = get_field(rec, field)
            if value and str(got) != value:
                return False
            if not value and got == MISSING:
                return False
        return not text or text.lower() in str(rec.get("text", "")).lower()

    try:
        hits = (r for r in iter_shard(folder, dropped) if match(r))
        docs = list(islice(hits, skip, skip + n + 1))
    except (FileNotFoundError, ValueError, OSError) as err:
        return [], str(err), False
    for d in docs:
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        d["meta_json"] = json.dumps(meta, ensure_ascii=False, indent=1, default=str)
        d["reason"] = meta.get("drop_reason") or meta.get("reason") or ""
    return docs[:n], None, len(docs) > n


def leaderboard(store: Store) -> tuple[list[dict[str, Any]], str | None]:
    """Finished eval runs with their task scores (and confidence intervals where results.json has them)."""
    board = []
    for run in store.runs("eval", "done", limit=500):
        path = Path(run["path"]) / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        tasks = results.get("tasks") or {}
        board.append({"run": run, "model": results.get("model", "?"), "tasks": tasks,
                      "aggregate": results.get("aggregate_centered"), "val_loss": results.get("val_loss")})
    board.sort(key=lambda b: -(b["aggregate"] if isinstance(b["aggregate"], (int, float)) else float("-inf")))
    return board, None if board else "no finished eval run with results.json in the registry"
