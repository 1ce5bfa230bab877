"""The run registry: one SQLite file that records runs, artifacts and lineage edges.

A run row also holds the process that runs it (pid, host) and a heartbeat it refreshes while running, so a run killed
without a chance to say so (SIGKILL, the OOM killer) shows as ``stale`` instead of ``running`` forever; and the run
id of the unfinished run it resumes.

Where it lives: ``$LMFORGE_HOME/registry.sqlite`` (``LMFORGE_HOME`` defaults to ``./runs``).  Every ``StageRun``
writes to it when it starts and when it finishes; ``lmforge runs`` and ``lmforge lineage PATH`` read it.  An edge
``src -> dst`` with a role (``data``, ``tokenizer``, ``model`` ...) says that artifact ``dst`` was made from ``src``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.artifacts import heartbeat_seconds

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
    error TEXT,
    pid INTEGER,
    host TEXT,
    heartbeat_at REAL,
    resumes TEXT
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


# columns added since the first schema: a registry file written by an older lmforge gets them on first connect
ADDED_COLUMNS = {"pid": "INTEGER", "host": "TEXT", "heartbeat_at": "REAL", "resumes": "TEXT"}


def connect(path: str | os.PathLike | None = None) -> sqlite3.Connection:
    path = Path(path) if path else registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
    for name, kind in ADDED_COLUMNS.items():
        if name not in have:
            try:
                with con:
                    con.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise
    con.execute("CREATE INDEX IF NOT EXISTS runs_resumes ON runs(resumes)")  # `resumed_by` look-ups in list_runs
    # newest-first listings, all runs or one stage's (`lmforge runs --stage`, the dashboard's runs page)
    con.execute("CREATE INDEX IF NOT EXISTS runs_stage_started ON runs(stage, started_at)")
    con.execute("CREATE INDEX IF NOT EXISTS runs_started ON runs(started_at)")
    con.row_factory = sqlite3.Row
    return con


def record_start(run: "StageRun") -> None:
    with closing(connect()) as con, con:
        con.execute(
            "INSERT OR REPLACE INTO runs(run_id, stage, path, fingerprint, status, started_at, config, pid, host,"
            " heartbeat_at, resumes) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.stage, str(run.dir.resolve()), run.fingerprint, time.time(), json.dumps(run.config),
             os.getpid(), socket.gethostname(), time.time(), run.resumes),
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


def heartbeat(run_id: str, at: float) -> None:
    with closing(connect()) as con, con:
        con.execute("UPDATE runs SET heartbeat_at=? WHERE run_id=? AND status='running'", (at, run_id))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _age(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}min" if seconds < 7200 else \
        f"{seconds / 3600:.0f}h"


def state(row: dict[str, Any], now: float | None = None) -> str:
    """What a run's status means now.  ``done`` / ``failed`` / ``interrupted`` are final; a ``running`` row is shown
    ``running`` only while its process lives and its heartbeat is fresh, else ``stale (...)`` with the reason (the
    process was killed by SIGKILL or the OOM killer, the machine went down ...)."""
    if row["status"] != "running":
        return row["status"]
    return process_state(row.get("pid"), row.get("host"), row.get("heartbeat_at"), row["started_at"], now)


def process_state(pid: int | None, host: str | None, beat: float | None, started_at: float,
                  now: float | None = None) -> str:
    """``running`` (or ``running on HOST``) when the process of a run that says it is running still runs, else
    ``stale (why)``."""
    now = time.time() if now is None else now
    if pid is None:
        return "stale (no pid recorded)"  # a row written before lmforge recorded processes
    late = beat is None or now - beat > 4 * heartbeat_seconds() + 5
    if host == socket.gethostname():
        if not _pid_alive(int(pid)):
            return f"stale (pid {pid} gone)"
        if late:
            return f"stale (pid {pid} alive, no heartbeat for {_age(now - (beat or started_at))})"
        return "running"
    if late:
        return f"stale (no heartbeat from {host} for {_age(now - (beat or started_at))})"
    return f"running on {host}"


def list_runs(stage: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    with closing(connect()) as con:
        q = ("SELECT r.*, (SELECT group_concat(n.run_id) FROM runs n WHERE n.resumes = r.run_id) AS resumed_by"
             " FROM runs r")
        args: tuple = ()
        if stage:
            q += " WHERE r.stage=?"
            args = (stage,)
        q += " ORDER BY r.started_at DESC LIMIT ?"
        rows = [dict(r) for r in con.execute(q, args + (limit,)).fetchall()]
    for r in rows:
        r["state"] = state(r)
    return rows


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
                "status": state(dict(row)),
                "resumes": row["resumes"],
                "config": json.loads(row["config"]),
                "metrics": json.loads(row["metrics"] or "{}"),
                "inputs": {},
            }
            if depth < max_depth:
                for e in con.execute("SELECT * FROM edges WHERE dst_run=? ORDER BY role", (row["run_id"],)):
                    out["inputs"][e["role"]] = node(e["src"], e["src_fingerprint"], depth + 1, row["started_at"])
            return out

        return node(str(Path(path).resolve()), None, 0)
