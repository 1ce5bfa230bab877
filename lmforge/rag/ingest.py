"""Ingest: a folder (recursive) of .txt / .md / .html / .pdf / .jsonl files → ``SourceDoc`` records.

Every file is hashed (sha256 of its bytes) so re-indexing can tell unchanged, changed, new and deleted files apart.
A file that cannot be used is *skipped with a reason* (``binary``, ``empty``, ``unsupported_type``, ``pdf_error``,
``no_text``, ``unreadable``, ``bad_jsonl_line``) that ends up in the index report; ingest never stops on one bad file.
Text files are UTF-8 or the encoding detected (``lmforge.data.textdecode``: a Windows-1252 ``.txt`` is read, not
skipped), HTML the encoding resiliparse detects; ``SourceDoc.encoding`` and the report's ``encodings`` say which.
A binary file with a text name (magic number, NUL bytes, control characters, no encoding fits) is ``binary``.

HTML main text comes from the data stage's extractor (``HtmlExtract``, resiliparse); its ``h1``–``h6`` headings are
kept (as a text → level map) so the chunker can give each chunk its heading path.  A ``.jsonl`` file gives one
document per line with a ``text`` field (``title`` optional); its path is ``file.jsonl#LINE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmforge.data.textdecode import decode_text, find_surrogate, sniff_binary

SUPPORTED = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
             ".pdf": "pdf", ".jsonl": "jsonl"}


@dataclass
class SourceDoc:
    """One document of the knowledge base.  ``path`` is relative to the ingested folder (POSIX separators)."""

    path: str
    type: str  # txt / md / html / pdf / jsonl
    text: str
    title: str = ""
    headings: dict[str, int] = field(default_factory=dict)  # HTML: heading line text → level (1..6)
    file_sha256: str = ""
    encoding: str = ""  # the encoding the file was decoded with (utf-8, cp1252, ...); "" for PDF


@dataclass
class FileRecord:
    """What ingest made of one file: its hash, and the documents it gave or the reason it was skipped."""

    path: str
    sha256: str
    type: str
    docs: list[SourceDoc] = field(default_factory=list)
    skipped: str | None = None  # reason
    encoding: str = ""  # text / HTML: the encoding assumed
    detail: str = ""
    warnings: list[str] = field(default_factory=list)  # e.g. a bad line in a JSONL file


def list_files(root: str | os.PathLike) -> list[Path]:
    """Every regular file below ``root`` (recursive, sorted), hidden files and folders excluded."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():
            out.append(p)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode_text(data: bytes) -> tuple[str | None, str]:
    """``(text, encoding)`` of a text file, or ``(None, reason)``."""
    if not data.strip():
        return None, "empty"
    text, encoding = decode_text(data)
    if text is None:
        return None, encoding  # "binary: why"
    return text.removeprefix("\ufeff"), encoding


_HEADING_TAGS = "h1, h2, h3, h4, h5, h6"


def _html_doc(data: bytes, rel: str) -> tuple[SourceDoc | None, str | None]:
    from resiliparse.parse.html import HTMLTree

    from lmforge.data.documents import Document
    from lmforge.data.readers import decode_html_encoding
    from lmforge.data.steps import HtmlExtract

    if not data.strip():
        return None, "empty"
    why = sniff_binary(data)
    if why:
        return None, f"binary: {why}"
    html, encoding = decode_html_encoding(data)
    result = HtmlExtract().process(Document(rel, html, {"source": rel, "format": "html"}))
    if isinstance(result, str):
        return None, "no_text"
    headings: dict[str, int] = {}
    tree = HTMLTree.parse(html)
    if tree.body is not None:
        for el in tree.body.query_selector_all(_HEADING_TAGS):
            text = " ".join(el.text.replace("¶", "").split())
            if text and text not in headings:
                headings[text] = int(el.tag[1])
    return SourceDoc(rel, "html", result.text, result.meta.get("title", ""), headings, encoding=encoding), None


def _pdf_doc(path: Path, rel: str) -> tuple[SourceDoc | None, str | None]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as err:
        return None, f"pdf_error: {type(err).__name__}: {err}"[:200]
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        return None, "no_text (a scanned PDF has no text layer)"
    return SourceDoc(rel, "pdf", text, str(title)), None


def _jsonl_docs(text: str, rel: str, record: FileRecord) -> None:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = find_surrogate(line)  # bytes that are not UTF-8 (surrogateescape), CESU-8 included
        if where:
            record.warnings.append(f"{rel}:{lineno}: bad_jsonl_line: not UTF-8 ({where.split(' ', 2)[-1]})")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            record.warnings.append(f"{rel}:{lineno}: bad_jsonl_line: {err.msg}")
            continue
        body = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(body, str) or not body.strip():
            record.warnings.append(f"{rel}:{lineno}: bad_jsonl_line: no string field 'text'")
            continue
        where = find_surrogate(obj)
        if where:
            record.warnings.append(f"{rel}:{lineno}: bad_jsonl_line: {where} is a lone surrogate (not a character)")
            continue
        record.docs.append(SourceDoc(f"{rel}#{lineno}", "jsonl", body, str(obj.get("title") or "")))


def _md_title(text: str) -> str:
    m = re.search(r"^#\s+(.+)$", text, re.M)
    return m.group(1).strip() if m else ""


def read_file(path: Path, root: Path) -> FileRecord:
    """Ingest one file.  Never raises for bad content: the record says why it was skipped."""
    rel = path.relative_to(root).as_posix()
    kind = SUPPORTED.get(path.suffix.lower(), "")
    try:
        sha = file_sha256(path)
        data = path.read_bytes() if kind != "pdf" else b""
    except OSError as err:
        return FileRecord(rel, "", kind, skipped="unreadable", detail=f"{type(err).__name__}: {err.strerror}")
    record = FileRecord(rel, sha, kind)
    if not kind:
        record.skipped, record.detail = "unsupported_type", f"extension {path.suffix or '(none)'!r}"
        return record
    doc, reason = None, None
    if kind == "html":
        doc, reason = _html_doc(data, rel)
    elif kind == "pdf":
        doc, reason = _pdf_doc(path, rel)
    elif kind == "jsonl" and data.strip() and not sniff_binary(data):
        # JSON Lines are UTF-8 by definition: decode line by line, so one bad line costs only itself
        record.encoding = "utf-8"
        _jsonl_docs(data.decode("utf-8", "surrogateescape").removeprefix("\ufeff"), rel, record)
        if not record.docs:
            reason = "no_text (no valid JSONL line with a 'text' field)"
    else:
        text, reason = _decode_text(data)
        if text is not None:
            record.encoding, reason = reason, None
            if kind == "jsonl":
                _jsonl_docs(text, rel, record)
                if not record.docs:
                    reason = "no_text (no valid JSONL line with a 'text' field)"
            else:
                doc = SourceDoc(rel, kind, text, _md_title(text) if kind == "md" else "", encoding=record.encoding)
    if reason:
        record.skipped, _, record.detail = reason.partition(": ")
        if " " in record.skipped:  # "no_text (why)"
            record.skipped, record.detail = record.skipped.split(" ", 1)[0], reason
        return record
    if doc is not None:
        record.docs.append(doc)
    for d in record.docs:
        d.file_sha256 = sha
        d.encoding = d.encoding or record.encoding
        record.encoding = record.encoding or d.encoding
        if not d.title:
            d.title = Path(rel).stem
    return record


def ingest_folder(root: str | os.PathLike) -> Iterator[FileRecord]:
    """``read_file`` over every file below ``root``."""
    root = Path(root)
    for path in list_files(root):
        yield read_file(path, root)
