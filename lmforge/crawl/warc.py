"""WARC output: one ``request`` + ``response`` + ``metadata`` record per fetched page, gzip per record (warcio),
files rotated by size.

A file being written is named ``*.warc.gz.open``; it gets its final name when it is full or the crawl stops, so a
reader never sees half a file.  The frontier stores, in the same transaction that marks a page done, the offset where
that page's records end.  After a SIGKILL the ``.open`` file is cut back to the last committed offset (records of
pages not marked done are dropped; those pages are fetched again), so no record is lost, duplicated or half-written.

The HTTP payload is stored as the crawler received it *after* content decoding (as Common Crawl does): the original
``Content-Encoding`` / ``Transfer-Encoding`` / ``Content-Length`` headers are kept renamed to ``X-Crawler-…`` and
``Content-Length`` states the stored length, so ``warcio check`` and any WARC reader see consistent records.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from lmforge import __version__

OPEN_SUFFIX = ".open"
_RENAMED = {"content-encoding", "transfer-encoding", "content-length"}


def warc_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def recover(folder: Path, committed: dict[str, int]) -> list[str]:
    """Close the ``.open`` files a killed crawl left: cut each back to its committed length and give it its final
    name.  Returns the names of the files recovered."""
    done = []
    for part in sorted(folder.glob("*" + OPEN_SUFFIX)):
        name = part.name[: -len(OPEN_SUFFIX)]
        keep = committed.get(name, 0)
        if keep <= 0:
            part.unlink()
            continue
        with open(part, "r+b") as f:
            f.truncate(keep)
        os.replace(part, folder / name)
        done.append(name)
    return done


class WarcSink:
    """Writes page records into ``folder/<prefix>-NNNNN.warc.gz``, starting a new file past ``max_bytes``."""

    def __init__(self, folder: Path, prefix: str, max_bytes: int, first_index: int,
                 on_open: Callable[[str, int], None] | None = None) -> None:
        """``on_open(name, offset)`` is called when a file is started (after its ``warcinfo`` record)."""
        self.folder = folder
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.index = first_index
        self.on_open = on_open
        self.records = 0
        self._full = False
        self._fh = None
        self._writer: WARCWriter | None = None
        self.name = ""
        folder.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self.name = f"{self.prefix}-{self.index:05d}.warc.gz"
        self.index += 1
        self._fh = open(self.folder / (self.name + OPEN_SUFFIX), "wb")
        self._writer = WARCWriter(self._fh, gzip=True, warc_version="1.1")
        info = {"software": f"lmforge/{__version__} (crawl)", "format": "WARC File Format 1.1",
                "conformsTo": "https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/"}
        self._writer.write_record(self._writer.create_warcinfo_record(self.name, info))
        self._fh.flush()
        if self.on_open:
            self.on_open(self.name, self._fh.tell())

    def close(self) -> None:
        """Give the current file its final name (every record in it is complete)."""
        if self._fh is None:
            return
        self._fh.close()
        os.replace(self.folder / (self.name + OPEN_SUFFIX), self.folder / self.name)
        self._fh = None
        self._writer = None
        self._full = False

    def write_page(self, *, url: str, fetched_at: float, request_headers: list[tuple[str, str]], http_version: str,
                   status: int, reason: str, response_headers: list[tuple[str, str]], body: bytes,
                   metadata: dict[str, str]) -> tuple[str, int]:
        """Write the request, response and metadata records of one page; returns (file name, end offset)."""
        if self._full:  # rotate now, not right after the last write: that page's commit came in between
            self.close()
        if self._fh is None:
            self._open()
        w = self._writer
        assert w is not None and self._fh is not None
        date = warc_date(fetched_at)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        proto = "HTTP/2" if http_version.upper().startswith("HTTP/2") else "HTTP/1.1"
        req = w.create_warc_record(
            url, "request", payload=BytesIO(b""), length=0,
            warc_headers_dict={"WARC-Date": date},
            http_headers=StatusAndHeaders(f"GET {target} {proto}", request_headers, is_http_request=True))
        encoded = any(k.lower() in ("content-encoding", "transfer-encoding") for k, _ in response_headers)
        headers = [(("X-Crawler-" + k) if k.lower() in _RENAMED else k, v) for k, v in response_headers
                   if encoded or k.lower() != "content-length" or v.strip() != str(len(body))]
        headers.append(("Content-Length", str(len(body))))
        resp = w.create_warc_record(
            url, "response", payload=BytesIO(body), length=len(body),
            warc_headers_dict={"WARC-Date": date},
            http_headers=StatusAndHeaders(f"{status} {reason}".strip(), headers, protocol=proto))
        resp_id = resp.rec_headers.get_header("WARC-Record-ID")
        req.rec_headers.add_header("WARC-Concurrent-To", resp_id)
        fields = "".join(f"{k}: {v}\r\n" for k, v in metadata.items()).encode("utf-8")
        meta = w.create_warc_record(
            url, "metadata", payload=BytesIO(fields), length=len(fields), warc_content_type="application/warc-fields",
            warc_headers_dict={"WARC-Date": date, "WARC-Concurrent-To": resp_id})
        for rec in (req, resp, meta):
            w.write_record(rec)
        self._fh.flush()
        self.records += 3
        end = self._fh.tell()
        self._full = end >= self.max_bytes
        return self.name, end
