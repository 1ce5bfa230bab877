"""URL canonicalisation and the crawler's URL rules (scope, filters, trap limits).

Canonical form (RFC 3986 §6 syntax normalisation plus the usual crawler rules), so that one page has one key in the
frontier:

1. only ``http`` / ``https``; scheme and host lower-case, an internationalised host in IDNA (punycode);
2. the default port (80 / 443) dropped, user info dropped;
3. dot segments (``/a/./b/../c``) removed, an empty path becomes ``/``;
4. percent-encoding normalised: escapes of unreserved characters decoded, other escapes upper-cased, spaces and
   non-ASCII characters encoded (UTF-8);
5. the fragment (``#...``) dropped: it never reaches the server;
6. query parameters sorted (``?b=1&a=2`` → ``?a=2&b=1``), tracking parameters (``utm_*``, ``fbclid``, ``gclid``, …)
   dropped, an empty query dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

TRACKING_PARAMS = re.compile(r"^(utm_[a-z]+|fbclid|gclid|dclid|msclkid|mc_cid|mc_eid|_ga|yclid)$", re.I)
_UNRESERVED = re.compile(r"%([0-9A-Fa-f]{2})")
_SAFE_PATH = "/:@!$&'()*+,;=-._~%"
_SAFE_QUERY = "/:@!$'()*,;-._~?"  # after parse_qsl decoded them: '&', '=', '+', '%' in a key/value get escaped


class BadUrl(ValueError):
    """A string that is not an absolute http(s) URL."""


def _norm_escapes(part: str, safe: str) -> str:
    def fix(m: re.Match) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if (ch.isascii() and (ch.isalnum() or ch in "-._~")) else "%" + m.group(1).upper()

    return quote(_UNRESERVED.sub(fix, part), safe=safe)


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def canonicalize(url: str, base: str | None = None) -> str:
    """The canonical form of ``url`` (resolved against ``base`` when relative); raises :class:`BadUrl`."""
    url = url.strip()
    try:
        if base is not None:
            url = urljoin(base, url)
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise BadUrl(f"{url!r} is not a valid URL: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadUrl(f"{url!r} is not an http(s) URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise BadUrl(f"{url!r} has no host")
    try:
        host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        raise BadUrl(f"{url!r} has an invalid host name") from None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    path = _norm_escapes(_remove_dot_segments(parts.path or "/"), _SAFE_PATH)
    query = ""
    if parts.query:
        pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not TRACKING_PARAMS.match(k)]
        query = urlencode(sorted(pairs), quote_via=quote, safe=_SAFE_QUERY)
    return urlunsplit((scheme, netloc, path, query, ""))


def host_of(url: str) -> str:
    """``scheme://host[:port]`` of a canonical URL: the unit of politeness (robots.txt, rate, concurrency)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


@dataclass
class UrlRules:
    """Which discovered URLs enter the frontier; ``reject`` returns the reason a URL is refused, or None."""

    max_depth: int = 5
    same_host: bool = False
    seed_hosts: set[str] = field(default_factory=set)
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    max_url_length: int = 1024
    max_query_params: int = 8
    max_path_repeats: int = 3

    def __post_init__(self) -> None:
        self._allow = [re.compile(p) for p in self.allow]
        self._deny = [re.compile(p) for p in self.deny]

    def reject(self, url: str, depth: int) -> str | None:
        if depth > self.max_depth:
            return "depth"
        if self.same_host and host_of(url) not in self.seed_hosts:
            return "off_host"
        if self._allow and not any(p.search(url) for p in self._allow):
            return "not_allowed"
        if any(p.search(url) for p in self._deny):
            return "denied"
        if len(url) > self.max_url_length:
            return "trap_url_length"
        p = urlsplit(url)
        if p.query and len(parse_qsl(p.query, keep_blank_values=True)) > self.max_query_params:
            return "trap_query_params"
        segments = [s for s in p.path.split("/") if s]
        if segments and max(segments.count(s) for s in set(segments)) > self.max_path_repeats:
            return "trap_path_repeats"
        return None


def check_seed(seed: str, where: str) -> str:
    """The canonical form of a seed, or a ``ValueError`` naming where it came from."""
    try:
        return canonicalize(seed)
    except BadUrl as err:
        raise ValueError(f"crawl: seed {where}: {err}; seeds are absolute http(s) URLs such as "
                         "https://example.org/") from None

