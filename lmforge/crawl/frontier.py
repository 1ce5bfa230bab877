"""The crawl frontier in SQLite (``frontier.sqlite`` in the crawl folder): every admitted URL with its state, and the
counts of discovered URLs that were refused, by reason.

A page is finished in one transaction: its outcome, where its WARC records end, the links it yielded and the refusal
counts.  So after an interruption (SIGINT or SIGKILL) the frontier and the WARC files agree: a page is either done
(its records are in a WARC file) or still queued (it is fetched again), never both or neither.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lmforge.crawl.urls import BadUrl, UrlRules, canonicalize, host_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS urls(
    id INTEGER PRIMARY KEY,
    url TEXT UNIQUE NOT NULL,
    host TEXT NOT NULL,
    depth INTEGER NOT NULL,
    via TEXT NOT NULL,                  -- seed / link / sitemap / redirect
    parent TEXT,
    chain TEXT NOT NULL DEFAULT '[]',   -- the redirect chain that led here (JSON list of URLs)
    state TEXT NOT NULL DEFAULT 'queued',  -- queued / done
    outcome TEXT,                       -- ok / redirect / http_404 / robots / size_limit / error:timeout …
    http_status INTEGER,
    bytes INTEGER,
    attempts INTEGER,
    error TEXT,
    warc_file TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS urls_by_host ON urls(state, host, depth, id);
CREATE TABLE IF NOT EXISTS rejected(reason TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS hosts(host TEXT PRIMARY KEY, robots_status INTEGER, robots_txt TEXT, robots_error TEXT,
                                 sitemaps TEXT);
CREATE TABLE IF NOT EXISTS warc_files(name TEXT PRIMARY KEY, committed INTEGER NOT NULL);
"""


@dataclass
class Item:
    id: int
    url: str
    host: str
    depth: int
    chain: list[str]
    parent: str | None = None


@dataclass
class Link:
    url: str            # as found (relative or absolute)
    base: str           # the URL it is relative to
    depth: int
    via: str
    chain: tuple[str, ...] = ()


class Frontier:
    def __init__(self, path: Path, rules: UrlRules, max_pages_per_host: int) -> None:
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.executescript(SCHEMA)
        self.rules = rules
        self.max_pages_per_host = max_pages_per_host
        self.per_host = Counter(dict(self.con.execute("SELECT host, COUNT(*) FROM urls GROUP BY host").fetchall()))
        self.queued = Counter(dict(self.con.execute(
            "SELECT host, COUNT(*) FROM urls WHERE state='queued' GROUP BY host").fetchall()))
        self._last_claim: dict[str, float] = {}

    def close(self) -> None:
        self.con.close()

    # -- reading ------------------------------------------------------------------------------------------------------
    def claim(self, busy: Counter, host_limit: int, exclude_ids: Iterable[int]) -> Item | None:
        """The next URL to fetch: from the host with queued URLs, fewer than ``host_limit`` requests in flight
        (``busy``) and the longest wait since its last claim (round robin), its shallowest queued URL that is not
        already being fetched.  Index lookups only, however large the frontier."""
        ready = [h for h, n in self.queued.items() if n > busy[h] and busy[h] < host_limit]
        if not ready:
            return None
        host = min(ready, key=lambda h: self._last_claim.get(h, 0.0))
        self._last_claim[host] = time.monotonic()
        ids = list(exclude_ids)
        row = self.con.execute(
            "SELECT id, url, host, depth, chain, parent FROM urls WHERE state='queued' AND host=?"
            + (f" AND id NOT IN ({','.join('?' * len(ids))})" if ids else "") + " ORDER BY depth, id LIMIT 1",
            [host, *ids]).fetchone()
        return Item(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5]) if row else None

    def count(self, state: str) -> int:
        return self.con.execute("SELECT COUNT(*) FROM urls WHERE state=?", (state,)).fetchone()[0]

    def outcomes(self) -> dict[str, int]:
        rows = self.con.execute("SELECT outcome, COUNT(*) FROM urls WHERE state='done' GROUP BY outcome")
        return dict(sorted(rows.fetchall()))

    def rejected(self) -> dict[str, int]:
        return dict(sorted(self.con.execute("SELECT reason, n FROM rejected").fetchall()))

    def committed_warcs(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT name, committed FROM warc_files").fetchall())

    def host_row(self, host: str) -> tuple | None:
        return self.con.execute("SELECT robots_status, robots_txt, robots_error, sitemaps FROM hosts WHERE host=?",
                                (host,)).fetchone()

    # -- writing ------------------------------------------------------------------------------------------------------
    def _admit(self, links: Iterable[Link], refused: Counter) -> int:
        added = 0
        for link in links:
            try:
                url = canonicalize(link.url, link.base)
            except BadUrl:
                refused["bad_url"] += 1
                continue
            if link.via == "redirect" and url in link.chain:
                refused["redirect_loop"] += 1
                continue
            reason = self.rules.reject(url, link.depth)
            if reason is None and self.con.execute("SELECT 1 FROM urls WHERE url=?", (url,)).fetchone():
                reason = "dedup"
            host = host_of(url)
            if reason is None and self.per_host[host] >= self.max_pages_per_host:
                reason = "host_limit"
            if reason:
                refused[reason] += 1
                continue
            self.con.execute("INSERT INTO urls(url, host, depth, via, parent, chain) VALUES (?, ?, ?, ?, ?, ?)",
                             (url, host, link.depth, link.via, link.base, json.dumps(list(link.chain))))
            self.per_host[host] += 1
            self.queued[host] += 1
            added += 1
        return added

    def _bump(self, refused: Counter) -> None:
        for reason, n in refused.items():
            self.con.execute("INSERT INTO rejected(reason, n) VALUES (?, ?) "
                             "ON CONFLICT(reason) DO UPDATE SET n = n + excluded.n", (reason, n))

    def add(self, links: list[Link], refused: Counter | None = None, host: tuple | None = None) -> int:
        """Admit seeds or sitemap URLs (and record a host's robots/sitemap state, ``host`` = the ``hosts`` row, in the
        same transaction); returns how many were new."""
        refused = Counter(refused or {})
        with self.con:
            self.con.execute("BEGIN")
            if host is not None:
                self.con.execute("INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?)", host)
            added = self._admit(links, refused)
            self._bump(refused)
        return added

    def finish(self, item: Item, outcome: str, *, status: int | None = None, nbytes: int | None = None,
               attempts: int = 0, error: str | None = None, warc: tuple[str, int] | None = None,
               links: list[Link] = (), refused: Counter | None = None) -> int:
        """Mark a page done with its outcome and admit the links it yielded, in one transaction."""
        refused = Counter(refused or {})
        with self.con:
            self.con.execute("BEGIN")
            self.con.execute(
                "UPDATE urls SET state='done', outcome=?, http_status=?, bytes=?, attempts=?, error=?, warc_file=?, "
                "finished_at=? WHERE id=?",
                (outcome, status, nbytes, attempts, error, warc[0] if warc else None, time.time(), item.id))
            if warc:
                self.con.execute("UPDATE warc_files SET committed=? WHERE name=?", (warc[1], warc[0]))
            added = self._admit(links, refused)
            self._bump(refused)
        self.queued[item.host] -= 1
        if not self.queued[item.host]:
            del self.queued[item.host]
        return added

    def warc_opened(self, name: str, offset: int) -> None:
        with self.con:
            self.con.execute("INSERT OR REPLACE INTO warc_files(name, committed) VALUES (?, ?)", (name, offset))
