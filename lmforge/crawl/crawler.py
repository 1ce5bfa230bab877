"""The crawl loop: workers take URLs from the frontier, fetch them politely, write WARC records, admit new links.

Every admitted URL ends in exactly one outcome (``ok``, ``redirect``, ``http_<status>``, ``robots``,
``robots_unavailable``, ``content_type``, ``size_limit``, ``error:<class>`` such as ``error:timeout``,
``error:protocol``, ``error:internal``) or stays ``queued`` (page budget spent);
every discovered URL that is not admitted is counted under one reason (``dedup``, ``depth``, ``off_host``,
``not_allowed``, ``denied``, ``trap_url_length``, ``trap_query_params``, ``trap_path_repeats``, ``host_limit``,
``redirect_loop``, ``too_many_redirects``, ``bad_url``).  ``stats.json`` shows both, and they add up.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from typing import Any, TextIO

from lmforge.crawl.fetch import HTML_TYPES, FetchError, Fetched, HostPolicy, extract_links, fetch, sitemap_locs
from lmforge.crawl.frontier import Frontier, Item, Link
from lmforge.crawl.urls import BadUrl, canonicalize
from lmforge.crawl.warc import WarcSink
from lmforge.progress import console

_ROBOTS_LINE = re.compile(r"^\s*(#.*)?$|^\s*[A-Za-z][A-Za-z_-]*\s*:")
MAX_ROBOTS_BYTES = 500 * 1024  # RFC 9309 §2.5: parse at least 500 KiB


def robots_bad_lines(text: str) -> list[int]:
    """Line numbers of a robots.txt that are neither blank, a comment nor a ``Field: value`` line."""
    return [i for i, line in enumerate(text.splitlines(), 1) if not _ROBOTS_LINE.match(line)]


class Crawler:
    def __init__(self, cfg: Any, frontier: Frontier, sink: WarcSink, log: TextIO, user_agent: str) -> None:
        self.cfg = cfg
        self.frontier = frontier
        self.sink = sink
        self.log = log
        self.user_agent = user_agent
        self.hosts: dict[str, HostPolicy] = {}
        self.host_notes: dict[str, dict[str, Any]] = {}
        self.inflight: dict[int, str] = {}
        self.busy: Counter = Counter()
        self.requests: Counter = Counter()  # this session: robots / sitemap / page requests (with retries)
        self.processed = 0                  # pages finished in this session
        self.fetched = frontier.con.execute(
            "SELECT COUNT(*) FROM urls WHERE state='done' AND outcome NOT LIKE 'robots%'").fetchone()[0]
        self.content_types = tuple(t.lower() for t in cfg.content_types)
        self._changed: asyncio.Event | None = None
        self._client = None  # the aiohttp.ClientSession while running
        self._progress = None

    # -- the loop -----------------------------------------------------------------------------------------------------
    async def run(self, progress_cb=None) -> None:
        self._changed = asyncio.Event()
        self._progress = progress_cb
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency, limit_per_host=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": self.user_agent},
                                         timeout=aiohttp.ClientTimeout(total=None), trust_env=False) as client:
            self._client = client
            workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def _budget_left(self) -> bool:
        return not self.cfg.max_pages or self.fetched + len(self.inflight) < self.cfg.max_pages

    async def _worker(self) -> None:
        assert self._changed is not None
        while True:
            item = None
            if self._budget_left():
                item = self.frontier.claim(self.busy, self.cfg.host_concurrency, self.inflight.keys())
            if item is None:
                if not self.inflight:
                    self._changed.set()  # wake the others: nothing is left to do
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            self.inflight[item.id] = item.host
            self.busy[item.host] += 1
            try:
                await self._process(item)
            except Exception as exc:  # noqa: BLE001 - one page's unexpected failure is counted, not fatal
                detail = f"{item.url}: {type(exc).__name__}: {exc}"
                console.print(f"[red]✗ {detail}[/]", highlight=False)
                self._done(item, "error:internal", error=detail)
            finally:
                del self.inflight[item.id]
                self.busy[item.host] -= 1
                self._changed.set()

    # -- one host: robots.txt and sitemaps, once ----------------------------------------------------------------------
    async def _host(self, host: str) -> HostPolicy:
        policy = self.hosts.get(host)
        if policy is None:
            policy = self.hosts[host] = HostPolicy(interval=1.0 / self.cfg.host_rate if self.cfg.host_rate else 0.0)
        if policy.ready:
            return policy
        async with policy.lock:
            if policy.ready:
                return policy
            row = self.frontier.host_row(host)
            if row is not None:  # resumed: robots.txt as fetched before, sitemaps already read
                self._apply_robots(host, policy, row[0], row[1], row[2])
                self.host_notes[host]["sitemaps"] = json.loads(row[3] or "[]")
            else:
                status, text, error = await self._fetch_robots(host, policy)
                self._apply_robots(host, policy, status, text, error)
                links, refused, sitemaps = await self._read_sitemaps(host, policy)
                self.frontier.add(links, refused, host=(host, status, text, error, json.dumps(sitemaps)))
            policy.ready = True
        return policy

    async def _fetch_robots(self, host: str, policy: HostPolicy) -> tuple[int | None, str | None, str | None]:
        if not self.cfg.robots:
            return None, None, None
        self.requests["robots"] += 1
        try:
            got = await self._get(host + "/robots.txt", policy, max_bytes=MAX_ROBOTS_BYTES, types=None, follow=True,
                                  keep_prefix=True)
        except FetchError as err:
            return None, None, str(err)
        if got.skipped == "size_limit":  # RFC 9309 §2.5: the rules in the first 500 KiB apply
            console.print(f"[yellow]⚠ {host}/robots.txt is larger than {MAX_ROBOTS_BYTES:,} bytes: only its start is "
                          "read[/]", highlight=False)
        return got.status, (got.body or b"").decode("utf-8", errors="replace"), None

    def _apply_robots(self, host: str, policy: HostPolicy, status: int | None, text: str | None,
                      error: str | None) -> None:
        note: dict[str, Any] = {"robots": "off" if not self.cfg.robots else "missing"}
        if not self.cfg.robots:
            pass
        elif error or status is None or status >= 500:
            policy.disallow_all = True
            note["robots"] = "unavailable"
            note["robots_error"] = error or f"HTTP {status}"
            console.print(f"[yellow]⚠ {host}/robots.txt unavailable ({note['robots_error']}): not crawling this host "
                          "(RFC 9309)[/]", highlight=False)
        elif 200 <= status < 300 and text is not None:
            from protego import Protego

            note["robots"] = "ok"
            bad = robots_bad_lines(text)
            if bad:
                note["robots_bad_lines"] = len(bad)
                console.print(f"[yellow]⚠ {host}/robots.txt: {len(bad)} malformed line(s) ignored (first: line "
                              f"{bad[0]})[/]", highlight=False)
            policy.robots = Protego.parse(text)
            delay = policy.robots.crawl_delay(self.user_agent)
            rate = policy.robots.request_rate(self.user_agent)
            if delay:
                note["crawl_delay"] = float(delay)
                policy.interval = max(policy.interval, float(delay))
            if rate and rate.requests:
                note["request_rate"] = f"{rate.requests}/{rate.seconds}s"
                policy.interval = max(policy.interval, rate.seconds / rate.requests)
        note["interval_s"] = round(policy.interval, 4)
        self.host_notes[host] = note

    async def _read_sitemaps(self, host: str, policy: HostPolicy) -> tuple[list[Link], Counter, list[str]]:
        links: list[Link] = []
        refused: Counter = Counter()
        if not self.cfg.sitemaps:
            return links, refused, []
        listed = list(dict.fromkeys(policy.robots.sitemaps if policy.robots is not None else []))
        # a sitemap on another host would be fetched outside that host's politeness: left out, and said so
        todo = [u for u in listed if u.startswith(host + "/")]
        if len(todo) < len(listed):
            self.host_notes[host]["sitemaps_other_host_skipped"] = len(listed) - len(todo)
        if host + "/sitemap.xml" not in todo and policy.allowed(host + "/sitemap.xml", self.user_agent) is None:
            todo.append(host + "/sitemap.xml")
        read: list[str] = []
        while todo and len(read) < self.cfg.max_sitemaps_per_host:
            url = todo.pop(0)
            read.append(url)
            self.requests["sitemap"] += 1
            try:
                got = await self._get(url, policy, max_bytes=max(self.cfg.max_bytes, 50 * 2**20), types=None,
                                      follow=True)
            except FetchError:
                continue
            if got.status != 200 or got.body is None:
                continue
            locs, is_index = sitemap_locs(got.body)
            if is_index:
                todo += [u for u in locs if u not in read and u not in todo]
            else:
                links += [Link(loc, url, 1, "sitemap") for loc in locs]
        self.host_notes[host]["sitemaps"] = read
        return links, refused, read

    async def _get(self, url: str, policy: HostPolicy, *, max_bytes: int, types: tuple[str, ...] | None,
                   follow: bool = False, keep_prefix: bool = False) -> Fetched:
        return await fetch(self._client, url, policy, timeout=self.cfg.timeout, retries=self.cfg.retries,
                           backoff=self.cfg.retry_backoff, max_bytes=max_bytes, content_types=types,
                           follow_redirects=follow, keep_prefix=keep_prefix)

    # -- one page -----------------------------------------------------------------------------------------------------
    def _log(self, item: Item, outcome: str, **extra: Any) -> None:
        rec = {"time": round(time.time(), 3), "url": item.url, "depth": item.depth, "outcome": outcome, **extra}
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()

    def _done(self, item: Item, outcome: str, counted: bool = True, **kw: Any) -> None:
        self.frontier.finish(item, outcome, **kw)
        self.processed += 1
        if counted:
            self.fetched += 1
        self._log(item, outcome, status=kw.get("status"), bytes=kw.get("nbytes"), attempts=kw.get("attempts"),
                  error=kw.get("error"))
        if self._progress:
            self._progress(self)

    async def _process(self, item: Item) -> None:
        policy = await self._host(item.host)
        reason = policy.allowed(item.url, self.user_agent) if self.cfg.robots else None
        if reason:
            self._done(item, reason, counted=False)
            return
        self.requests["page"] += 1
        try:
            got = await self._get(item.url, policy, max_bytes=self.cfg.max_bytes, types=self.content_types)
        except FetchError as err:
            self.requests["page"] += err.attempts - 1
            console.print(f"[yellow]⚠ {err} (after {err.attempts} attempt(s))[/]", highlight=False)
            self._done(item, f"error:{err.kind}", attempts=err.attempts, error=str(err))
            return
        self.requests["page"] += got.attempts - 1
        if got.skipped:
            self._done(item, got.skipped, status=got.status, attempts=got.attempts, error=f"{item.url}: {got.detail}")
            return
        assert got.body is not None
        links: list[Link] = []
        refused: Counter = Counter()
        if 300 <= got.status < 400 and got.header("location"):
            outcome = "redirect"
            chain = tuple(item.chain) + (item.url,)
            if len(chain) > self.cfg.max_redirects:
                refused["too_many_redirects"] += 1
            else:
                links.append(Link(got.header("location") or "", item.url, item.depth, "redirect", chain))
        elif 200 <= got.status < 300:
            outcome = "ok"
            if got.content_type in HTML_TYPES:
                hrefs, base = extract_links(got.body, got.charset)
                page_base = item.url
                if base:
                    try:
                        page_base = canonicalize(base, item.url)
                    except BadUrl:
                        pass
                links = [Link(h, page_base, item.depth + 1, "link") for h in hrefs]
        else:
            outcome = f"http_{got.status}"
        metadata = {"via": item.parent or "", "depth": str(item.depth),
                    "fetchTimeMs": str(round(got.seconds * 1000)), "attempts": str(got.attempts),
                    "outlinks": str(len(links))}
        warc = self.sink.write_page(
            url=item.url, fetched_at=got.fetched_at, request_headers=got.request_headers,
            http_version=got.http_version, status=got.status, reason=got.reason, response_headers=got.headers,
            body=got.body, metadata={k: v for k, v in metadata.items() if v})
        self._done(item, outcome, status=got.status, nbytes=len(got.body), attempts=got.attempts, warc=warc,
                   links=links, refused=refused)
