"""Readers: one per input format, chosen by file extension, each yielding :class:`Document` objects.

| extension | reader | one document per |
|---|---|---|
| ``.warc``, ``.warc.gz``, ``.warc.zst`` | :func:`read_warc` (fastwarc) | HTTP 200 ``response`` record with an HTML payload |
| ``.wet``, ``.warc.wet.gz`` | :func:`read_warc` | ``conversion`` record (already plain text) |
| ``.html``, ``.htm`` (``.gz``) | :func:`read_html` | file |
| ``.jsonl``, ``.ndjson``, ``.json.gz`` (``.gz``/``.zst``) | :func:`read_jsonl` | line (``text`` field; other fields → meta) |
| ``.txt`` (``.gz``/``.zst``) | :func:`read_text` | file, or chunks of about ``chunk_chars`` cut at blank lines |
| ``.parquet`` | :func:`read_parquet` (pyarrow) | row (``text`` column; other columns → meta) |

Text and HTML files are sniffed first: a binary file with a text name (magic number, NUL bytes, control
characters, or bytes no text encoding fits) is a ``read_error:binary``.  Plain text is UTF-8 or the encoding
charset-normalizer detects (see :mod:`lmforge.data.textdecode`), HTML the one resiliparse detects; ``meta.encoding``
says which.  A JSONL record holding a lone surrogate is a ``read_error:invalid_unicode``.

HTML documents leave the reader as raw markup with ``meta["format"] = "html"``; the ``html_extract_v1`` step turns
them into text.  Bad input never raises out of a reader: it is reported to a :class:`ReadLog` with a
``read_error:<reason>`` key, the file and the line, and reading goes on with the next record or file.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from lmforge.data.documents import Document
from lmforge.data.io import JSONL_SUFFIXES, ReadError, TruncationAwareGzip, iter_jsonl, read_bytes
from lmforge.data.textdecode import decode_text, sniff_binary

MAX_WARNINGS_PER_REASON = 20


class ReadLog:
    """Counts read errors and skipped records by reason and logs each error (file and line) as a yellow warning."""

    def __init__(self, quiet: bool = False) -> None:
        self.errors: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.quiet = quiet

    def error(self, reason: str, source: str | Path, line: int | None = None, detail: str = "") -> None:
        self.errors[reason] += 1
        where = f"{source}:{line}" if line else str(source)
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append({"id": where, "source": str(source), "snippet": detail[:300]})
        if self.quiet:
            return
        n = self.errors[reason]
        if n <= MAX_WARNINGS_PER_REASON:
            from rich.markup import escape

            from lmforge.progress import console

            console.print(f"[yellow]⚠ {reason}[/] {escape(where)}: {escape(detail)}", highlight=False)
        elif n == MAX_WARNINGS_PER_REASON + 1:
            from lmforge.progress import console

            console.print(f"[yellow]⚠ {reason}[/]: more errors of this kind are counted but not shown")

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


# ----------------------------------------------------------------------------------------------------------------------
# formats


def file_format(path: Path) -> str | None:
    """``warc`` / ``wet`` / ``html`` / ``jsonl`` / ``text``, or None for a file we do not read."""
    name = path.name.lower()
    for comp in (".gz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    if name.endswith(".wet") or name.endswith(".warc.wet"):
        return "wet"
    if name.endswith(".warc") or name.endswith(".arc"):
        return "warc"
    if name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if name.endswith(tuple(s.removesuffix(".gz").removesuffix(".zst") for s in JSONL_SUFFIXES)) or name.endswith(
        ".json"
    ):
        return "jsonl"
    if name.endswith(".txt") or name.endswith(".text"):
        return "text"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def read_file(path: Path, log: ReadLog, chunk_chars: int = 20_000,
              origins: dict[str, str] | None = None) -> Iterator[Document]:
    """Documents of one input file, by extension.  Never raises for bad content: errors go to ``log``.

    ``origins`` maps local copies of remote inputs (:mod:`lmforge.storage`) to their URLs: documents read from a copy
    name the URL in ``meta.source`` and in ids built from the path, as if read from the bucket itself."""
    docs = _read_file(path, log, chunk_chars)
    root = next((r for r in (origins or {}) if str(path) == r or str(path).startswith(r.rstrip("/") + "/")), None)
    if root is None:
        yield from docs
        return
    url = origins[root]  # type: ignore[index]

    def rename(s: str) -> str:  # root/jsonl/a.jsonl:12 → URL/jsonl/a.jsonl:12; a copied file → URL:12
        rest = s[len(root):]
        return url.rstrip("/") + rest if rest.startswith("/") else url + rest

    for doc in docs:
        src = doc.meta.get("source")
        if isinstance(src, str) and src.startswith(root):
            doc.meta["source"] = rename(src)
        if doc.id.startswith(root):
            doc.id = rename(doc.id)
        yield doc


def _read_file(path: Path, log: ReadLog, chunk_chars: int) -> Iterator[Document]:
    fmt = file_format(path)
    if fmt is None:
        log.skip("unknown_format")
        return
    try:
        if path.stat().st_size == 0:
            log.error("read_error:empty_file", path, None, "the file is empty")
            return
        if fmt in ("warc", "wet"):
            yield from read_warc(path, log)
        elif fmt == "html":
            yield from read_html(path, log)
        elif fmt == "jsonl":
            yield from read_jsonl(path, log)
        elif fmt == "parquet":
            yield from read_parquet(path, log)
        else:
            yield from read_text(path, log, chunk_chars)
    except ReadError as err:
        log.error(err.reason, path, err.line, err.detail)
    except OSError as err:
        log.error("read_error:os_error", path, None, str(err))


def _decode(data: bytes, path: Path, log: ReadLog, truncated: bool) -> tuple[str, str] | None:
    """``(text, encoding)`` of a text file's bytes (UTF-8, else the encoding detected); None (reported as
    ``read_error:binary``) when the bytes are a binary file or fit no text encoding."""
    if truncated:  # a character cut in half by the truncation
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start >= len(data) - 4:
                data = data[: err.start]
    text, encoding = decode_text(data)
    if text is None:
        log.error("read_error:binary", path, None, f"{encoding.removeprefix('binary: ')}; the file was skipped")
        return None
    return text, encoding


_PARA_BREAK = re.compile(r"\n[ \t]*\n\s*")


def read_text(path: Path, log: ReadLog, chunk_chars: int = 20_000) -> Iterator[Document]:
    """A plain-text file (a book): one document, or several of at least ``chunk_chars`` characters each, cut at blank
    lines (deterministic; ``chunk_chars=0`` keeps the whole file).  ``meta.line`` is the first line of the chunk."""
    data, truncated = read_bytes(path)
    if not data.strip():
        if truncated:
            log.error(truncated, path, None, "the compressed stream ends before any text")
        else:
            log.error("read_error:empty_file", path, None, "no text in the file")
        return
    decoded = _decode(data, path, log, truncated is not None)
    if decoded is None:
        return
    text, encoding = decoded
    if "\r" in text:  # universal newlines, as Python's text mode: chunking and line numbers do not depend on them
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    source = str(path)
    start, line, part = 0, 1, 0
    if chunk_chars > 0 and len(text) > chunk_chars:
        for m in _PARA_BREAK.finditer(text, chunk_chars):
            if m.start() - start < chunk_chars:
                continue
            yield Document(f"{source}:{line}", text[start : m.start()],
                           {"source": source, "line": line, "chunk": part, "format": "text", "encoding": encoding})
            line += text.count("\n", start, m.end())
            start = m.end()
            part += 1
    if text[start:].strip():
        yield Document(f"{source}:{line}", text[start:],
                       {"source": source, "line": line, "chunk": part, "format": "text", "encoding": encoding})
    if truncated:
        log.error(truncated, path, line, "the compressed stream ends early; the text before the break was kept")


_CANONICAL = re.compile(
    rb"""<link\b[^>]*\brel=["']?canonical["']?[^>]*\bhref=["']([^"']+)["']|"""
    rb"""<meta\b[^>]*\bproperty=["']og:url["'][^>]*\bcontent=["']([^"']+)["']""",
    re.I,
)


def decode_html(data: bytes, declared: str | None = None) -> str:
    return decode_html_encoding(data, declared)[0]


_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


# labels that browsers read as a superset (WHATWG Encoding Standard)
_WHATWG = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "iso-8859-1": "cp1252", "latin1": "cp1252",
           "us-ascii": "cp1252", "ascii": "cp1252", "big5": "big5hkscs"}


def decode_html_encoding(data: bytes, declared: str | None = None) -> tuple[str, str]:
    """An HTML page's text and the encoding used: the declared one (HTTP header) if it works, else the one resiliparse
    detects (BOM, ``<meta charset>``, then content)."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    if declared:
        try:
            return bytes_to_str(data, declared), declared.lower()
        except (LookupError, ValueError):
            pass
    if data.isascii():  # resiliparse says cp1252 (the WHATWG default) for pure ASCII; any ASCII superset reads it
        return data.decode("ascii"), "utf-8"
    m = _META_CHARSET.search(data[:4096])
    if m:  # the page's own <meta charset>, when it decodes the page
        try:
            name = m.group(1).decode("ascii").lower()
            name = _WHATWG.get(name, name)
            return data.decode(name), name
        except (LookupError, UnicodeDecodeError):
            pass
    else:  # no charset anywhere: resiliparse's content guess misreads e.g. Big5 as GBK; charset-normalizer (and the
        # line-by-line decoding of pages that mix UTF-8 with a legacy encoding) does better
        text, encoding = decode_text(data)
        if text is not None:
            return text, encoding
    encoding = detect_encoding(data)
    return bytes_to_str(data, encoding), encoding


def read_html(path: Path, log: ReadLog) -> Iterator[Document]:
    """One HTML file → one document with the raw markup (``meta.format = "html"``); ``meta.url`` from the page's
    canonical link or ``og:url`` when it has one."""
    data, truncated = read_bytes(path)
    if not data.strip():
        log.error(truncated or "read_error:empty_file", path, None, "no content")
        return
    why = sniff_binary(data)
    if why:
        log.error("read_error:binary", path, None, f"{why}; the file was skipped")
        return
    source = str(path)
    meta: dict[str, Any] = {"source": source, "format": "html"}
    m = _CANONICAL.search(data, 0, 32_768)
    if m:
        meta["url"] = (m.group(1) or m.group(2)).decode("utf-8", "replace")
    html, meta["encoding"] = decode_html_encoding(data)
    yield Document(source, html, meta)
    if truncated:
        log.error(truncated, path, None, "the compressed stream ends early; the page was kept as far as it goes")


def read_jsonl(path: Path, log: ReadLog) -> Iterator[Document]:
    """One document per JSON line: ``text`` is the text, ``id`` the id (else ``path:line``), ``meta`` and every other
    field go into meta."""
    source = str(path)

    def on_error(reason: str, line: int | None, detail: str) -> None:
        log.error(reason, path, line, detail)

    for line_no, rec in iter_jsonl(path, on_error):
        doc = _record_to_document(rec, source, "line", line_no)
        if doc is None:
            log.error("read_error:missing_text", path, line_no, "the record has no string 'text' field")
            continue
        yield doc


def _record_to_document(rec: dict, source: str, locator: str, where: int) -> Document | None:
    """A JSONL / Parquet record as a Document (None without a string ``text``); other fields go into meta."""
    text = rec.get("text")
    if not isinstance(text, str):
        return None
    meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
    for k, v in rec.items():
        if k not in ("id", "text", "meta"):
            meta.setdefault(k, v)
    meta["source"] = source
    meta[locator] = where
    meta.setdefault("format", "text")
    doc_id = rec.get("id")
    return Document(str(doc_id) if doc_id is not None else f"{source}:{where}", text, meta)


def read_parquet(path: Path, log: ReadLog, batch_rows: int = 1024) -> Iterator[Document]:
    """One document per row: the ``text`` column is the text, ``id`` the id (else ``path:row``); a ``meta`` column
    holding a JSON object (as lmforge writes it) or a struct, and every other column, go into meta.  ``meta.row`` is
    the 0-based row number.  A file without a ``text`` column, or one pyarrow cannot read, is a read error."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        log.error("read_error:bad_parquet", path, None, str(err))
        return
    if "text" not in pf.schema_arrow.names:
        log.error("read_error:missing_text", path, None,
                  f"no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for rec in _batch_rows(batch, path, row, log):
                if rec is None:  # a row with a string that is not UTF-8, reported
                    row += 1
                    continue
                if isinstance(rec.get("meta"), str):
                    try:
                        rec["meta"] = json.loads(rec["meta"])
                    except ValueError:
                        log.error("read_error:malformed_json", path, row, "the 'meta' column is not a JSON object")
                        rec["meta"] = None
                doc = _record_to_document(rec, source, "row", row)
                if doc is None:
                    log.error("read_error:missing_text", path, row, "the row has no string 'text'")
                else:
                    yield doc
                row += 1
    except (pa.ArrowException, OSError) as err:
        log.error("read_error:bad_parquet", path, row, str(err))


def _batch_rows(batch: Any, path: Path, first_row: int, log: ReadLog) -> list[dict | None]:
    """The rows of a record batch as dicts; a row holding a string that is not valid UTF-8 (Parquet does not enforce
    it) becomes None and is reported as ``read_error:not_utf8``, the other rows of the batch are kept."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    rows: list[dict | None] = []
    for i in range(batch.num_rows):
        try:
            rows.append(batch.slice(i, 1).to_pylist()[0])
        except UnicodeDecodeError as err:
            log.error("read_error:not_utf8", path, first_row + i, f"a string column holds invalid UTF-8 ({err.reason} "
                      f"at byte {err.start}); the row was dropped")
            rows.append(None)
    return rows


_HTML_TYPES = ("text/html", "application/xhtml+xml")


def read_warc(path: Path, log: ReadLog) -> Iterator[Document]:
    """WARC ``response`` records (HTTP 200, HTML) → raw-HTML documents; WET ``conversion`` records → text documents.

    ``meta``: ``url`` (WARC-Target-URI), ``warc_record_id``, ``warc_date``, ``offset`` (of the record in the file).
    Other responses are counted as skipped (``not_html``, ``http_<status>``).  A record cut off by a truncated file
    is reported (``read_error:truncated_record``); the records before it are kept.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    source = str(path)
    wet = file_format(path) == "wet"
    rtypes = WarcRecordType.conversion if wet else WarcRecordType.response
    gz = path.name.endswith(".gz")
    stream = TruncationAwareGzip(path, "rb") if gz else open(path, "rb")
    truncation_reported = False
    partial = ""
    try:
        it = ArchiveIterator(stream, record_types=rtypes, parse_http=not wet, stream_detect=not gz)
        while True:
            try:
                rec = next(it)
            except StopIteration:
                break
            except Exception as err:  # a record fastwarc cannot parse ends the file
                log.error("read_error:bad_warc_record", path, None, str(err))
                truncation_reported = True
                break
            offset = rec.stream_pos
            uri = rec.headers.get("WARC-Target-URI", "")
            try:
                body = rec.reader.read()
            except Exception as err:
                log.error("read_error:bad_warc_record", path, None, f"record at offset {offset}: {err}")
                continue
            if len(body) < rec.content_length:
                partial = f"record at offset {offset} ({uri}) has {len(body)} of {rec.content_length} bytes"
                if not gz:
                    log.error("read_error:truncated_record", path, None, partial)
                    truncation_reported = True
                continue
            meta: dict[str, Any] = {
                "source": source,
                "offset": offset,
                "url": uri,
                "warc_record_id": (rec.record_id or "").strip("<>"),
                "warc_date": rec.headers.get("WARC-Date", ""),
            }
            doc_id = meta["warc_record_id"] or f"{source}@{offset}"
            if wet:
                meta["format"] = "text"
                yield Document(doc_id, body.decode("utf-8", "replace"), meta)
                continue
            status = rec.http_headers.status_code if rec.http_headers else None
            if status != 200:
                log.skip(f"http_{status}")
                continue
            ctype = (rec.http_content_type or "").lower()
            if ctype and ctype not in _HTML_TYPES:
                log.skip("not_html")
                continue
            if not body.strip():
                log.skip("empty_body")
                continue
            if sniff_binary(body):
                log.skip("binary_body")
                continue
            meta["format"] = "html"
            yield Document(doc_id, decode_html(body, rec.http_charset), meta)
        if gz and stream.truncated and not truncation_reported:
            log.error("read_error:truncated_gzip", path, None,
                      "the gzip stream ends before its end marker" + (f"; dropped the partial {partial}" if partial else "")
                      + "; the records before the break were kept")
    finally:
        stream.close()
