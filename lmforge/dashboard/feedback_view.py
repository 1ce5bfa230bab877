"""The Feedback page's data: answers recorded by ``lmforge serve --record`` and the feedback on them, read-only from
``$LMFORGE_HOME/feedback.sqlite`` (``lmforge.feedback.store``); a missing or unreadable file is a message."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from lmforge.dashboard.store import PageError
from lmforge.feedback.store import RATING_FILTERS, load, read_only, summary

PAGE_SIZE = 100


def db_path(home: Path) -> Path:
    return Path(home) / "feedback.sqlite"


def listing(home: Path, rating: str = "", annotator: str = "", serve_run: str = "", text: str = "",
            skip: int = 0) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
    """``(summary or None when nothing is recorded, responses of this page, more after them)``."""
    path = db_path(home)
    if not path.is_file():
        return None, [], False
    if rating and rating not in RATING_FILTERS:
        raise PageError(f"rating: one of {', '.join(RATING_FILTERS)} (got {rating!r})", 400)
    try:
        with closing(read_only(path)) as con:
            rows = load(con, [serve_run] if serve_run else None, limit=PAGE_SIZE + 1, offset=max(skip, 0),
                        text=text, rating=rating, annotator=annotator)
            head = summary(con)
    except sqlite3.DatabaseError as err:
        raise PageError(f"the recordings {path} cannot be read: {err}", 503) from None
    for r in rows:
        r["prompt"] = last_user_text(r)
        r["ups"] = sum(f["rating"] == "up" for f in r["feedback"])
        r["downs"] = sum(f["rating"] == "down" for f in r["feedback"])
        r["corrections"] = sum(bool(f["correction"]) for f in r["feedback"])
    return head, rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


def response(home: Path, response_id: str) -> dict[str, Any]:
    path = db_path(home)
    try:
        with closing(read_only(path)) as con:
            rows = load(con, ids=[response_id])
    except FileNotFoundError as err:
        raise PageError(str(err), 404) from None
    except sqlite3.DatabaseError as err:
        raise PageError(f"the recordings {path} cannot be read: {err}", 503) from None
    if not rows:
        raise PageError(f"no recorded response {response_id!r} in {path}", 404)
    r = rows[0]
    r["prompt"] = last_user_text(r)
    return r


def last_user_text(r: dict[str, Any]) -> str:
    request = r.get("request") or {}
    if "messages" in request:
        users = [m.get("content") for m in request["messages"] if m.get("role") == "user"]
        text = users[-1] if users else ""
        return text if isinstance(text, str) else str(text)
    prompts = request.get("prompt") or [""]
    return str(prompts[0])
