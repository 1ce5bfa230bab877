"""What the dashboard reads: the registry (read-only) and run folders, with every failure turned into a message.

The registry is opened read-only (``mode=ro``): the dashboard never creates, migrates or locks it, so a training or
serving process writing runs is never blocked by a page view.  Rows are read with ``SELECT *`` into dicts, so columns
added by newer registries (pid, host, heartbeat) are used when present and ignored when absent.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

LOG_TAIL_BYTES = 16_000


class PageError(Exception):
    """A problem to show in the page as a plain message (never a stack trace)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Store:
    def __init__(self, home: str | os.PathLike) -> None:
        self.home = Path(home).resolve()
        self.db = self.home / "registry.sqlite"

    # -- registry -----------------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection | None:
        if not self.db.is_file():
            return None
        con = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True, timeout=5)
        con.row_factory = sqlite3.Row
        return con

    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        try:
            con = self._connect()
            if con is None:
                return []
            with closing(con):
                return [dict(r) for r in con.execute(sql, args).fetchall()]
        except sqlite3.DatabaseError as err:  # locked, corrupt, not a database, old schema
            if "no such table" in str(err):
                return []
            raise PageError(f"the registry {self.db} cannot be read: {err}", 503) from None

    def runs(self, stage: str = "", status: str = "", text: str = "", limit: int = 1000,
             offset: int = 0) -> list[dict[str, Any]]:
        """Newest first; ``status`` filters on the derived state (so it is applied after the query)."""
        where, args = [], []
        if stage:
            where.append("stage = ?")
            args.append(stage)
        if text:
            where.append("(run_id LIKE ? OR path LIKE ? OR stage LIKE ? OR config LIKE ?)")
            args += [f"%{text}%"] * 4
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY started_at DESC"
        if not status:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        rows = [with_derived(r) for r in self._rows(sql, tuple(args))]
        if status:  # on the derived status: "interrupted" includes runs whose process is gone
            rows = [r for r in rows if r["state"] == status][offset:offset + limit]
        return rows

    def count(self, stage: str = "") -> int:
        rows = self._rows("SELECT COUNT(*) AS n FROM runs" + (" WHERE stage = ?" if stage else ""),
                          (stage,) if stage else ())
        return rows[0]["n"] if rows else 0

    def stages(self) -> list[str]:
        return [r["stage"] for r in self._rows("SELECT DISTINCT stage FROM runs ORDER BY stage")]

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise PageError(f"no run {run_id!r} in {self.db}", 404)
        return with_derived(rows[0])

    def run_at(self, path: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM runs WHERE path = ? ORDER BY (status = 'done') DESC, started_at DESC LIMIT 1",
                          (path,))
        return with_derived(rows[0]) if rows else None

    def inputs_of(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM edges WHERE dst_run = ? ORDER BY role", (run_id,))

    def run_containing(self, path: str, before: float) -> dict[str, Any] | None:
        """The run that wrote the artifact folder holding file ``path`` (a DPO run reads ``export/dpo.jsonl``): the
        newest done run of the nearest parent folder that finished before ``before``, as ``lmforge lineage`` does."""
        for parent in Path(path).parents:
            rows = self._rows("SELECT * FROM runs WHERE path = ? AND status = 'done' AND finished_at <= ? "
                              "ORDER BY started_at DESC LIMIT 1", (str(parent), before))
            if rows:
                return with_derived(rows[0])
        return None

    def users_of(self, path: str, run_id: str) -> list[dict[str, Any]]:
        """Edges from this run's artifact: by run id, by its folder, or by a file inside the folder."""
        return self._rows("SELECT * FROM edges WHERE src = ? OR src_fingerprint = ? OR substr(src, 1, ?) = ? "
                          "ORDER BY role", (path, f"run:{run_id}", len(path) + 1, path.rstrip("/") + "/"))

    # -- run folders --------------------------------------------------------------------------------------------------
    def folder(self, run: dict[str, Any]) -> Path:
        folder = Path(run["path"])
        if not folder.is_dir():
            raise PageError(f"the run folder {folder} no longer exists (deleted or moved); the registry still "
                            f"lists run {run['run_id']}", 410)
        return folder

    def manifest(self, run: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, problem)``: the parsed manifest.json, or None and what is wrong with it."""
        path = Path(run["path"]) / "manifest.json"
        if not Path(run["path"]).is_dir():
            return None, f"the run folder {run['path']} no longer exists (deleted or moved)"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None, f"{path} is missing"
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return None, f"{path} is corrupt: {err}"
        if not isinstance(data, dict):
            return None, f"{path} is corrupt: not a JSON object"
        return data, None

    def file(self, run: dict[str, Any], rel: str) -> Path:
        """``rel`` inside the run folder; anything resolving outside it (``..``, absolute paths, symlinks out) is
        refused."""
        folder = self.folder(run).resolve()
        target = (folder / rel).resolve()
        if target != folder and folder not in target.parents:
            raise PageError(f"{rel!r} is outside the run folder", 403)
        if not target.exists():
            raise PageError(f"{rel!r} does not exist in {folder}", 404)
        return target

    def log_tail(self, run: dict[str, Any]) -> list[tuple[str, str]]:
        """The last bytes of every ``*.log`` file in the run folder (and the dashboard job log, if any)."""
        folder = Path(run["path"])
        out = []
        if folder.is_dir():
            for log in sorted(folder.glob("*.log")):
                out.append((log.name, tail(log)))
        return out


def tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            return f.read().decode("utf-8", "replace")
    except OSError as err:
        return f"({path.name} unreadable: {err})"


def process_alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie, dead but not yet reaped, is not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


HEARTBEAT_STALE_S = 300.0


def with_derived(row: dict[str, Any]) -> dict[str, Any]:
    """Adds ``state`` (the status, with ``running`` runs whose process is gone shown as ``interrupted``),
    ``duration_s`` and parsed ``metrics_d`` / ``config_d``."""
    state = row.get("status") or "unknown"
    if state == "running":
        pid, host, beat = row.get("pid"), row.get("host"), row.get("heartbeat") or row.get("heartbeat_at")
        if pid and host == socket.gethostname() and not process_alive(int(pid)):
            state = "interrupted"
        elif isinstance(beat, (int, float)) and time.time() - beat > HEARTBEAT_STALE_S:
            state = "interrupted"
    row["state"] = state
    end = row.get("finished_at") or (time.time() if state == "running" else None)
    row["duration_s"] = end - row["started_at"] if end and row.get("started_at") else None
    for key in ("metrics", "config"):
        try:
            value = json.loads(row.get(key) or "{}")
        except json.JSONDecodeError:
            value = {}
        row[key + "_d"] = value if isinstance(value, dict) else {}
    return row


# ----------------------------------------------------------------------------------------------------------------------
# metrics.jsonl, also while it is being written


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int, int]:
    """Complete records of ``metrics.jsonl`` from byte ``offset``: ``(records, new_offset, bad_lines)``.

    A last line without its newline is being written: it is left for the next read (``new_offset`` stops before it).
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            blob = f.read()
    except FileNotFoundError:
        raise PageError(f"{path} does not exist (not a training run, or it has not logged a step yet)", 404) from None
    end = blob.rfind(b"\n")
    if end < 0:
        return [], offset, 0
    records, bad = [], 0
    for line in blob[:end].split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    return records, offset + end + 1, bad


def iter_dir_files(folder: Path, limit: int = 200) -> Iterator[tuple[str, int]]:
    n = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            yield str(p.relative_to(folder)), p.stat().st_size
            n += 1
            if n >= limit:
                return
