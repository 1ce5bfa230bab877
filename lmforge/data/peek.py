"""Look at a data run: peek at documents with their meta (``lmforge data inspect``) and re-render the report from
``stats.json`` (``lmforge data report``).

    for doc in peek("runs/data", n=3): print(doc["id"], doc["meta"].get("lang"))
    print(format_peek(peek("runs/data/dropped/part-00000.jsonl.zst", n=5), field="meta.drop_reason"))
    field_counts("runs/data", "meta.lang")        # Counter over the whole shard(s)
    render_report("runs/data")                    # rewrites runs/data/report.html
"""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from lmforge.artifacts import write_text
from lmforge.data.io import iter_jsonl, iter_parquet

MISSING = "<missing>"


def shard_paths(path: str | os.PathLike, dropped: bool = False) -> list[Path]:
    """The shard files behind ``path``: a shard file itself (kept or dropped, .jsonl(.zst/.gz) or .parquet), or a run
    folder's ``docs/`` shards (``dropped/`` ones with ``dropped=True``)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        sub = p / ("dropped" if dropped else "docs")
        files = sorted(f for f in sub.glob("*") if f.name.endswith((".jsonl.zst", ".parquet"))) if sub.is_dir() else []
        if files:
            return files
        raise FileNotFoundError(f"{p}: no shards in {sub} (is it a data run folder?)")
    raise FileNotFoundError(f"{p}: no such shard file or run folder")


def iter_shard(path: str | os.PathLike, dropped: bool = False) -> Iterator[dict[str, Any]]:
    """Every record of the shard(s), as stored (``{id, text, meta}``)."""
    for f in shard_paths(path, dropped):
        if f.name.endswith(".parquet"):
            records = iter_parquet(f)
        else:
            def on_error(reason: str, line: int | None, detail: str, f: Path = f) -> None:
                raise ValueError(f"{f}:{line}: {reason} {detail}")

            records = iter_jsonl(f, on_error)
        for _, rec in records:
            yield rec


def get_field(rec: dict[str, Any], field: str) -> Any:
    """A dotted field of a record, e.g. ``meta.lang`` or ``meta.scores.words`` (:data:`MISSING` if absent)."""
    cur: Any = rec
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


def peek(path: str | os.PathLike, n: int = 5, dropped: bool = False) -> list[dict[str, Any]]:
    """The first ``n`` records."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(islice(iter_shard(path, dropped), n))


def field_counts(path: str | os.PathLike, field: str, dropped: bool = False) -> Counter:
    """How often each value of ``field`` occurs over all records of the shard(s)."""
    return Counter(json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
                   for v in (get_field(r, field) for r in iter_shard(path, dropped)))


def format_peek(records: list[dict[str, Any]], field: str | None = None, chars: int = 300) -> str:
    """A readable block per record: id, the text's start, and its meta (or just ``field``)."""
    out = []
    for rec in records:
        text = rec.get("text", "")
        snippet = text[:chars].replace("\n", " ⏎ ") + (" …" if len(text) > chars else "")
        shown = {field: get_field(rec, field)} if field else rec.get("meta", {})
        out.append(f"── {rec.get('id')}  ({len(text):,} chars)\n{snippet}\n"
                   + json.dumps(shown, ensure_ascii=False, default=str, sort_keys=True))
    return "\n".join(out)


def render_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Re-render ``report.html`` from a run's ``stats.json`` (e.g. after a report template change); returns its path."""
    from lmforge.data.report import render

    run = Path(run_dir)
    stats_path = run / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} does not exist (is {run} a finished data run?)")
    try:
        stats = json.loads(stats_path.read_text())
    except ValueError as err:
        raise ValueError(f"{stats_path}: not valid JSON ({err})") from None
    dest = Path(out) if out else run / "report.html"
    write_text(dest, render(stats, title=f"lmforge data report: {run}"))
    return dest
