"""The recordings of ``lmforge serve --record``: one SQLite file next to the registry
(``$LMFORGE_HOME/feedback.sqlite``) with

- ``serve_runs``: one row per recording server (its registry run id, model folder, the model's lineage id);
- ``responses``: every chat / completion answer (the id the client got, request messages or prompt, sampling
  parameters, each choice's text and finish reason, token counts, latency);
- ``feedback``: thumbs up / down on one choice of a response, with an optional correction, comment and annotator.

The server writes through one ``Recorder`` (one connection, a lock: the HTTP thread pool calls it); readers (the
export stage, the dashboard) open the file read-only with ``read_only()``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS serve_runs (
    run_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    model TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_lineage TEXT NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    serve_run TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    created REAL NOT NULL,
    model_lineage TEXT NOT NULL,
    request TEXT NOT NULL,
    params TEXT NOT NULL,
    choices TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_s REAL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses(created);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    rating TEXT,
    correction TEXT,
    comment TEXT,
    annotator TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback(response_id);
"""


def default_path() -> Path:
    from lmforge.registry import home

    return home() / "feedback.sqlite"


class UnknownResponse(KeyError):
    """No recorded response has this id."""


class Recorder:
    """The serving side: writes responses and feedback of one recording server run."""

    def __init__(self, path: str | os.PathLike, serve_run: str, run_path: str, model: str, model_name: str,
                 model_lineage: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.serve_run, self.model_lineage = serve_run, model_lineage
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.executescript(SCHEMA)
        with self._lock, self._con:
            self._con.execute("INSERT OR REPLACE INTO serve_runs VALUES (?, ?, ?, ?, ?, ?)",
                              (serve_run, run_path, model, model_name, model_lineage, time.time()))

    def record(self, response_id: str, endpoint: str, request: Any, params: dict[str, Any],
               choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int, latency_s: float) -> None:
        """``request``: the chat messages or the completion prompt(s); ``choices``: ``[{text, finish_reason, ...}]``."""
        with self._lock, self._con:
            self._con.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (response_id, self.serve_run, endpoint, time.time(), self.model_lineage,
                 json.dumps(request, ensure_ascii=False), json.dumps(params, ensure_ascii=False, default=str),
                 json.dumps(choices, ensure_ascii=False), prompt_tokens, completion_tokens, latency_s))

    def add_feedback(self, response_id: str, choice: int, rating: str | None, correction: str | None,
                     comment: str | None, annotator: str | None) -> dict[str, Any]:
        """Attach feedback to choice ``choice`` of a recorded response; ``UnknownResponse`` / ``IndexError``."""
        with self._lock, self._con:
            row = self._con.execute("SELECT choices FROM responses WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                raise UnknownResponse(response_id)
            n = len(json.loads(row[0]))
            if not 0 <= choice < n:
                raise IndexError(f"choice {choice}: response {response_id} has {n} choice(s) (0 to {n - 1})")
            now = time.time()
            cur = self._con.execute(
                "INSERT INTO feedback(response_id, choice, rating, correction, comment, annotator, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (response_id, choice, rating, correction, comment, annotator, now))
            return {"id": cur.lastrowid, "created": now}

    def counts(self) -> dict[str, int]:
        with self._lock:
            responses = self._con.execute("SELECT COUNT(*) FROM responses WHERE serve_run = ?",
                                          (self.serve_run,)).fetchone()[0]
            feedback = self._con.execute(
                "SELECT COUNT(*) FROM feedback f JOIN responses r ON r.id = f.response_id WHERE r.serve_run = ?",
                (self.serve_run,)).fetchone()[0]
        return {"responses": responses, "feedback": feedback}

    def close(self) -> None:
        with self._lock:
            self._con.close()


def read_only(path: str | os.PathLike) -> sqlite3.Connection:
    """The recordings opened read-only (never created, never locked for writing); ``FileNotFoundError`` if absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recordings at {path}: start a server with `lmforge serve MODEL --record`")
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    return con


RATING_FILTERS = {
    "any": "EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = r.id{who})",
    "none": "NOT EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = r.id{who})",
    "up": "EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = r.id AND f.rating = 'up'{who})",
    "down": "EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = r.id AND f.rating = 'down'{who})",
    "corrected": "EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = r.id AND f.correction IS NOT NULL{who})",
}


def load(con: sqlite3.Connection, serve_runs: list[str] | None = None, since: float | None = None,
         limit: int | None = None, *, text: str = "", rating: str = "", annotator: str = "",
         ids: list[str] | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Responses (newest first) with their parsed request, params, choices, the serve run's folder and model, and
    their feedback rows (oldest first) under ``feedback``.

    Filters: ``serve_runs``, ``since`` (created at or after), ``text`` (in the request or the answers), ``rating``
    (one of ``RATING_FILTERS``: has any / no / an up / a down / a corrected feedback, by ``annotator`` if given),
    ``annotator`` alone (has feedback from them), ``ids``."""
    where: list[str] = []
    args: list[Any] = []
    if serve_runs:
        where.append(f"r.serve_run IN ({', '.join('?' * len(serve_runs))})")
        args += serve_runs
    if ids:
        where.append(f"r.id IN ({', '.join('?' * len(ids))})")
        args += ids
    if since is not None:
        where.append("r.created >= ?")
        args.append(since)
    if text:
        where.append(  # in the texts only, not in the JSON around them (keys, finish reasons)
            "(r.id = ? OR EXISTS (SELECT 1 FROM json_each(r.choices) c WHERE json_extract(c.value, '$.text') LIKE ?)"
            " OR EXISTS (SELECT 1 FROM json_each(r.request, '$.messages') m"
            "            WHERE json_extract(m.value, '$.content') LIKE ?)"
            " OR EXISTS (SELECT 1 FROM json_each(r.request, '$.prompt') p WHERE p.value LIKE ?))")
        args += [text] + [f"%{text}%"] * 3
    if rating or annotator:
        if rating and rating not in RATING_FILTERS:
            raise ValueError(f"rating filter {rating!r}: one of {', '.join(RATING_FILTERS)}")
        where.append(RATING_FILTERS[rating or "any"].format(who=" AND f.annotator = ?" if annotator else ""))
        if annotator:
            args.append(annotator)
    sql = ("SELECT r.*, s.path AS serve_path, s.model AS model, s.model_name AS model_name FROM responses r "
           "LEFT JOIN serve_runs s ON s.run_id = r.serve_run" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY r.created DESC" + (f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit else ""))
    rows = [dict(r) for r in con.execute(sql, args)]
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        for key in ("request", "params", "choices"):
            r[key] = json.loads(r[key])
        r["feedback"] = []
    ids_ = list(by_id)
    for chunk in range(0, len(ids_), 500):
        part = ids_[chunk:chunk + 500]
        for f in con.execute(f"SELECT * FROM feedback WHERE response_id IN ({', '.join('?' * len(part))}) "
                             "ORDER BY id", part):
            by_id[f["response_id"]]["feedback"].append(dict(f))
    return rows


def summary(con: sqlite3.Connection) -> dict[str, Any]:
    """Counts for a page header: responses, feedback by rating, corrections, annotators, serve runs."""
    def one(sql: str) -> int:
        return con.execute(sql).fetchone()[0]

    return {"responses": one("SELECT COUNT(*) FROM responses"),
            "up": one("SELECT COUNT(*) FROM feedback WHERE rating = 'up'"),
            "down": one("SELECT COUNT(*) FROM feedback WHERE rating = 'down'"),
            "corrections": one("SELECT COUNT(*) FROM feedback WHERE correction IS NOT NULL"),
            "annotators": [r[0] for r in con.execute("SELECT DISTINCT annotator FROM feedback WHERE annotator IS NOT "
                                                     "NULL ORDER BY annotator")],
            "serve_runs": [dict(r) for r in con.execute("SELECT * FROM serve_runs ORDER BY started_at DESC")]}
