"""The run registry: one SQLite file that records runs, artifacts and lineage edges.

Where it lives: ``$LMFORGE_HOME/registry.sqlite`` (``LMFORGE_HOME`` defaults to ``./runs``).  Every ``StageRun``
writes to it when it starts and when it finishes; ``lmforge runs`` and ``lmforge lineage PATH`` read it.  An edge
``src -> dst`` with a role (``data``, ``tokenizer``, ``model`` ...) says that artifact ``dst`` was made from ``src``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.artifacts import Manifest, StageRun

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    path TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    config TEXT NOT NULL,
    metrics TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_path ON runs(path);
CREATE TABLE IF NOT EXISTS edges (
    src TEXT NOT NULL,
    dst_run TEXT NOT NULL,
    role TEXT NOT NULL,
    src_fingerprint TEXT NOT NULL,
    PRIMARY KEY (src, dst_run, role)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, name)
);
"""


def home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME", "runs"))


def registry_path() -> Path:
    return home() / "registry.sqlite"


def connect(path: str | os.PathLike | None = None) -> sqlite3.Connection:
    path = Path(path) if path else registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    con.row_factory = sqlite3.Row
    return con


def record_start(run: "StageRun") -> None:
    with closing(connect()) as con, con:
        con.execute(
            "INSERT OR REPLACE INTO runs(run_id, stage, path, fingerprint, status, started_at, config)"
            " VALUES (?, ?, ?, ?, 'running', ?, ?)",
            (run.run_id, run.stage, str(run.dir.resolve()), run.fingerprint, time.time(), json.dumps(run.config)),
        )
        for role, ref in run.inputs.items():
            con.execute(
                "INSERT OR REPLACE INTO edges(src, dst_run, role, src_fingerprint) VALUES (?, ?, ?, ?)",
                (ref.path, run.run_id, role, ref.fingerprint),
            )


def record_finish(run: "StageRun", manifest: "Manifest") -> None:
    with closing(connect()) as con, con:
        con.execute(
            "UPDATE runs SET status=?, finished_at=?, metrics=?, error=? WHERE run_id=?",
            (manifest.status, manifest.finished_at, json.dumps(manifest.metrics, default=str), manifest.error,
             run.run_id),
        )
        for name, value in manifest.metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                con.execute("INSERT OR REPLACE INTO metrics(run_id, name, value) VALUES (?, ?, ?)",
                            (run.run_id, name, float(value)))


def list_runs(stage: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    with closing(connect()) as con:
        q = "SELECT * FROM runs"
        args: tuple = ()
        if stage:
            q += " WHERE stage=?"
            args = (stage,)
        q += " ORDER BY started_at DESC LIMIT ?"
        rows = con.execute(q, args + (limit,)).fetchall()
    return [dict(r) for r in rows]


def latest_run(path: str | os.PathLike) -> dict[str, Any] | None:
    with closing(connect()) as con:
        row = con.execute(
            "SELECT * FROM runs WHERE path=? ORDER BY started_at DESC LIMIT 1", (str(Path(path).resolve()),)
        ).fetchone()
    return dict(row) if row else None


def lineage(path: str | os.PathLike, max_depth: int = 20) -> dict[str, Any]:
    """The tree of runs that produced ``path``: ``{stage, path, run_id, config, metrics, inputs: {role: tree}}``.

    Raw inputs (files that no run produced) appear as leaves with their content fingerprint.
    """
    with closing(connect()) as con:

        def node(p: str, fingerprint: str | None, depth: int, before: float = float("inf")) -> dict[str, Any]:
            if fingerprint and fingerprint.startswith("run:"):
                row = con.execute("SELECT * FROM runs WHERE run_id=?", (fingerprint[4:],)).fetchone()
            else:
                row = con.execute(
                    "SELECT * FROM runs WHERE path=? AND status='done' ORDER BY started_at DESC LIMIT 1", (p,)
                ).fetchone()
                if row is None and fingerprint is None:
                    row = con.execute("SELECT * FROM runs WHERE path=? ORDER BY started_at DESC LIMIT 1",
                                      (p,)).fetchone()
                for parent in (Path(p).parents if row is None and fingerprint else ()):
                    # a file or folder inside an artifact (a crawl's warc/ folder): the last run that wrote that
                    # artifact before its reader started
                    row = con.execute("SELECT * FROM runs WHERE path=? AND status='done' AND finished_at <= ? "
                                      "ORDER BY started_at DESC LIMIT 1", (str(parent), before)).fetchone()
                    if row is not None:
                        break
            if row is None:
                return {"path": p, "fingerprint": fingerprint, "raw": True}
            out: dict[str, Any] = {
                "stage": row["stage"],
                "path": row["path"],
                "run_id": row["run_id"],
                "status": row["status"],
                "config": json.loads(row["config"]),
                "metrics": json.loads(row["metrics"] or "{}"),
                "inputs": {},
            }
            if depth < max_depth:
                for e in con.execute("SELECT * FROM edges WHERE dst_run=? ORDER BY role", (row["run_id"],)):
                    out["inputs"][e["role"]] = node(e["src"], e["src_fingerprint"], depth + 1, row["started_at"])
            return out

        return node(str(Path(path).resolve()), None, 0)
