"""One HTTP fetch with the crawler's limits (aiohttp, asynchronous), and per-host politeness.

* a fetch streams the body and stops at ``max_bytes`` (``size_limit``); a 2xx response whose content type is not on
  the allow-list is closed before its body is read (``content_type``); the whole exchange has one deadline
  (``timeout``), so a server that trickles bytes cannot hold a worker;
* 5xx responses and transport errors (timeout, refused connection, a connection closed mid-body, bytes that are not
  HTTP) are retried with exponential backoff (``retry_backoff`` × 2^attempt); 4xx responses are not;
* ``HostPolicy`` spaces the requests to one host (``slot``): with a rate limit, one request at a time and at least
  ``interval`` seconds from the end of one to the start of the next, where the interval is the largest of
  1/``host_rate``, robots.txt ``Crawl-delay`` and ``Request-rate``; without one, up to ``host_concurrency`` requests
  in flight (the crawler's scheduler).
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, AsyncIterator

if TYPE_CHECKING:
    import aiohttp

HTML_TYPES = ("text/html", "application/xhtml+xml")


class FetchError(Exception):
    """A fetch that produced no HTTP response: ``kind`` is the error class (timeout, connect, protocol, …)."""

    def __init__(self, kind: str, url: str, detail: str, retryable: bool = True) -> None:
        detail = " ".join(detail.split())  # one line, whatever the library's message looks like
        super().__init__(f"{url}: {kind} error: {detail}")
        self.kind = kind
        self.url = url
        self.retryable = retryable
        self.attempts = 0


@dataclass
class Fetched:
    url: str
    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    request_headers: list[tuple[str, str]]
    content_type: str
    body: bytes | None          # None when the body was not kept (see ``skipped``)
    fetched_at: float
    seconds: float
    skipped: str | None = None  # content_type / size_limit
    detail: str = ""
    attempts: int = 1

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def charset(self) -> str | None:
        m = re.search(r"charset=[\"']?([\w.:-]+)", self.header("content-type") or "", re.I)
        return m.group(1) if m else None


@dataclass
class HostPolicy:
    """Politeness state of one host (scheme://host:port)."""

    interval: float = 0.0
    robots: object | None = None       # a protego.Protego, or None (no robots.txt: everything allowed)
    disallow_all: bool = False          # robots.txt unreachable (5xx / network error): RFC 9309 says stay away
    robots_note: str = ""
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    _last: float = float("-inf")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold this host's request slot for one request.  With an interval (a rate limit or a Crawl-delay) requests
        to the host go one at a time and each starts at least ``interval`` seconds after the previous one *ended*
        (as Nutch and Heritrix do): the server then never sees two requests closer than the interval, whatever the
        network or the event loop's delays.  Without one, the slot is free (``host_concurrency`` bounds the host)."""
        if self.interval <= 0:
            try:
                yield
            finally:  # remembered: robots.txt is fetched before its Crawl-delay is known
                self._last = time.monotonic()
            return
        async with self._turn:
            while (wait := self._last + self.interval - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            try:
                yield
            finally:
                self._last = time.monotonic()

    def allowed(self, url: str, agent: str) -> str | None:
        """None when robots.txt allows ``url``, else the reason (``robots`` / ``robots_unavailable``)."""
        if self.disallow_all:
            return "robots_unavailable"
        if self.robots is not None and not self.robots.can_fetch(url, agent):
            return "robots"
        return None


def _classify(err: Exception, url: str, timeout: float) -> FetchError:
    import aiohttp

    if isinstance(err, asyncio.TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
        return FetchError("timeout", url, f"no complete response within {timeout:g}s")
    if isinstance(err, aiohttp.ClientConnectorError):
        return FetchError("connect", url, str(err) or "connection failed")
    if isinstance(err, aiohttp.TooManyRedirects):
        return FetchError("redirects", url, "too many redirects", retryable=False)
    if isinstance(err, aiohttp.InvalidURL):
        return FetchError("bad_url", url, str(err), retryable=False)
    if isinstance(err, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError)):
        # a body cut short, a connection closed before the response, bytes that are not HTTP
        return FetchError("protocol", url, str(err) or type(err).__name__)
    if isinstance(err, (aiohttp.ClientError, OSError)):
        return FetchError("network", url, str(err) or type(err).__name__)
    return FetchError("http", url, f"{type(err).__name__}: {err}")


async def fetch_once(session: "aiohttp.ClientSession", url: str, *, max_bytes: int,
                     content_types: tuple[str, ...] | None, follow_redirects: bool = False,
                     keep_prefix: bool = False) -> Fetched:
    """GET ``url``; ``content_types`` None accepts any type; ``keep_prefix`` keeps the first ``max_bytes`` of a
    longer body (robots.txt) instead of dropping it."""
    import yarl

    start = time.time()
    async with session.get(yarl.URL(url, encoded=True), allow_redirects=follow_redirects) as resp:
        ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        version = f"HTTP/{resp.version.major}.{resp.version.minor}" if resp.version else "HTTP/1.1"
        base = dict(url=str(resp.url), status=resp.status, reason=resp.reason or "", http_version=version,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers],
                    request_headers=list(resp.request_info.headers.items()), content_type=ctype, fetched_at=start)
        if content_types is not None and 200 <= resp.status < 300 and ctype not in content_types:
            return Fetched(**base, body=None, seconds=time.time() - start, skipped="content_type",
                           detail=f"content type {ctype or '(none)'!r} is not on the allow-list")
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes and not keep_prefix:
            return Fetched(**base, body=None, seconds=time.time() - start, skipped="size_limit",
                           detail=f"Content-Length {int(declared):,} > {max_bytes:,} bytes")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):  # decoded (gzip/deflate/br) as it streams
            body += chunk
            if len(body) > max_bytes:
                resp.close()
                return Fetched(**base, body=bytes(body[:max_bytes]) if keep_prefix else None,
                               seconds=time.time() - start, skipped="size_limit",
                               detail=f"body passed {max_bytes:,} bytes; stopped reading")
        return Fetched(**base, body=bytes(body), seconds=time.time() - start)


async def fetch(client: "aiohttp.ClientSession", url: str, policy: HostPolicy, *, timeout: float, retries: int,
                backoff: float, max_bytes: int, content_types: tuple[str, ...] | None,
                follow_redirects: bool = False, keep_prefix: bool = False) -> Fetched:
    """``fetch_once`` behind the host's politeness slot, with retries; raises :class:`FetchError`."""
    for attempt in range(retries + 1):
        try:
            async with policy.slot():
                got = await asyncio.wait_for(
                    fetch_once(client, url, max_bytes=max_bytes, content_types=content_types,
                               follow_redirects=follow_redirects, keep_prefix=keep_prefix), timeout)
        except Exception as exc:  # noqa: BLE001 - every transport failure becomes a counted, named error
            err = _classify(exc, url, timeout)
            err.attempts = attempt + 1
            if not err.retryable or attempt == retries:
                raise err from None
        else:
            got.attempts = attempt + 1
            if got.status < 500 or attempt == retries:
                return got
        await asyncio.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.hrefs: list[str] = []
        self.nofollow = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag in ("a", "area") and a.get("href") and "nofollow" not in a.get("rel", "").lower():
            self.hrefs.append(a["href"])
        elif tag == "base" and a.get("href") and self.base is None:
            self.base = a["href"]
        elif tag == "meta" and a.get("name", "").lower() == "robots" and "nofollow" in a.get("content", "").lower():
            self.nofollow = True


def extract_links(body: bytes, charset: str | None) -> tuple[list[str], str | None]:
    """``<a href>`` / ``<area href>`` targets of an HTML page (none when ``<meta name=robots content=nofollow>``),
    and its ``<base href>``."""
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    p = _Links()
    try:
        p.feed(text)
        p.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; a page it chokes on yields the links found so far
        pass
    return ([] if p.nofollow else p.hrefs), p.base


_LOC = re.compile(rb"<(?:\w+:)?loc>\s*(.*?)\s*</(?:\w+:)?loc>", re.S | re.I)


def sitemap_locs(body: bytes) -> tuple[list[str], bool]:
    """The ``<loc>`` URLs of a sitemap (gzipped or not), and whether it is a sitemap index."""
    import gzip
    import html

    if body[:2] == b"\x1f\x8b":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError):
            return [], False
    locs = [html.unescape(m.decode("utf-8", "replace")) for m in _LOC.findall(body)]
    return locs, b"<sitemapindex" in body[:4096].lower() or b":sitemapindex" in body[:4096].lower()
