"""Reading and writing ``{id, text, meta}`` JSONL shards (plain, .gz, .zst).

For later stages::

    from lmforge.data.io import iter_documents, iter_texts
    for doc in iter_documents("runs/data"):      # a data artifact folder: its kept documents, shard by shard
        doc["id"], doc["text"], doc["meta"]
    for text in iter_texts("corpus.jsonl.zst"):   # or any JSONL(.gz/.zst) file, folder or glob of them

Compressed input is read as a stream of complete lines; a stream that ends early (a truncated download) is reported
as ``read_error:truncated_gzip`` / ``read_error:truncated_zstd`` after every complete line before the break was
yielded.  Writers go through :func:`lmforge.artifacts.atomic_path`, so a reader never sees half a shard.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import zstandard

from lmforge.artifacts import atomic_path, expand_paths, is_artifact, read_manifest
from lmforge.data.textdecode import find_surrogate, maybe_surrogate

ErrorHandler = Callable[[str, int | None, str], None]
"""``on_error(reason, line, detail)``: called for each bad record; ``reason`` is like ``read_error:malformed_json``."""

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")


class ReadError(Exception):
    """A whole input (or the rest of it) cannot be read; ``reason`` is a ``read_error:...`` key."""

    def __init__(self, reason: str, detail: str = "", line: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.line = line


# ----------------------------------------------------------------------------------------------------------------------
# compressed streams


class TruncationAwareGzip(gzip.GzipFile):
    """A GzipFile that reports a cut-off stream through ``.truncated`` instead of raising mid-read.

    ``gzip`` raises ``EOFError`` when the compressed stream ends before its end marker; everything decompressed before
    that point has already been returned, so turning the error into a clean EOF loses nothing and lets a consumer
    (e.g. fastwarc's record parser) finish the records it has.
    """

    truncated = False

    def read(self, size: int = -1) -> bytes:
        # GzipFile.read(n) loops over raw reads and would lose what it gathered when a later one raises, so gather
        # here from read1 (one raw read each): the EOFError then comes from a call that had nothing to return.
        parts: list[bytes] = []
        got = 0
        while size is None or size < 0 or got < size:
            chunk = self.read1(1 << 16 if size is None or size < 0 else min(size - got, 1 << 16))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        try:
            return super().read1(size)
        except EOFError:
            self.truncated = True
            return b""

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _zstd_chunks(f: BinaryIO, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd stream; raises ReadError if the last frame is cut off.

    ``zstandard``'s stream reader returns silently at a truncated frame, hence the frame bookkeeping here.
    """
    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    in_frame = False
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        while chunk:
            try:
                out = obj.decompress(chunk)
            except zstandard.ZstdError as err:
                raise ReadError("read_error:bad_zstd", str(err)) from None
            in_frame = True
            if out:
                yield out
            if obj.eof:
                chunk = obj.unused_data
                obj = dctx.decompressobj()
                in_frame = False
            else:
                chunk = b""
    if in_frame:
        raise ReadError("read_error:truncated_zstd", "the zstd stream ends inside a frame")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def iter_lines(path: str | os.PathLike) -> Iterator[bytes]:
    """Lines (without the newline) of a plain, .gz or .zst file.  Raises ReadError on a truncated/corrupt stream
    after yielding every complete line before the break."""
    path = Path(path)
    name = path.name
    if name.endswith(".gz"):
        f = TruncationAwareGzip(path, "rb")
        try:
            pending = b""
            while True:
                try:
                    chunk = f.read(1 << 20)
                except (gzip.BadGzipFile, zlib.error) as err:
                    raise ReadError("read_error:bad_gzip", str(err)) from None
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                yield from lines
            if f.truncated:
                # the last, incomplete line is part of the loss
                raise ReadError("read_error:truncated_gzip", "the gzip stream ends before its end marker")
            if pending:
                yield pending
        finally:
            f.close()
    elif name.endswith(".zst"):
        with open(path, "rb") as raw:
            yield from _split_lines(_zstd_chunks(raw))
    else:
        with open(path, "rb") as raw:
            for line in raw:
                yield line.rstrip(b"\n")


def read_bytes(path: str | os.PathLike) -> tuple[bytes, str | None]:
    """The whole (decompressed) content of a file and, if the stream was cut off, the ``read_error`` reason."""
    path = Path(path)
    if path.name.endswith(".gz"):
        with TruncationAwareGzip(path, "rb") as f:
            try:
                data = f.read()
            except (gzip.BadGzipFile, zlib.error) as err:
                raise ReadError("read_error:bad_gzip", str(err)) from None
            return data, ("read_error:truncated_gzip" if f.truncated else None)
    if path.name.endswith(".zst"):
        parts: list[bytes] = []
        with open(path, "rb") as raw:
            try:
                for chunk in _zstd_chunks(raw):
                    parts.append(chunk)
            except ReadError as err:
                if err.reason != "read_error:truncated_zstd":
                    raise
                return b"".join(parts), err.reason
        return b"".join(parts), None
    return path.read_bytes(), None


# ----------------------------------------------------------------------------------------------------------------------
# JSONL


def iter_jsonl(path: str | os.PathLike, on_error: ErrorHandler) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, record)`` for every good JSON object line; bad lines go to ``on_error`` and are skipped.

    Reasons: ``read_error:not_utf8``, ``read_error:malformed_json``, ``read_error:not_an_object``,
    ``read_error:invalid_unicode`` (a lone surrogate: a ``\\ud800`` escape or CESU-8 bytes, which no UTF-8 writer can
    encode), and (ending the file) ``read_error:truncated_gzip`` / ``read_error:truncated_zstd`` / ``read_error:bad_gzip``.
    """
    line_no = 0
    loads = json.loads
    try:
        for line_no, raw in enumerate(iter_lines(path), 1):
            if not raw.strip():
                continue
            try:
                rec = loads(raw)
            except UnicodeDecodeError as err:
                on_error("read_error:not_utf8", line_no, f"invalid byte at column {err.start + 1}")
                continue
            except ValueError as err:
                on_error("read_error:malformed_json", line_no, str(err))
                continue
            if not isinstance(rec, dict):
                on_error("read_error:not_an_object", line_no, f"a JSON {type(rec).__name__}, not an object")
                continue
            if maybe_surrogate(raw):
                where = find_surrogate(rec)
                if where:
                    on_error("read_error:invalid_unicode", line_no,
                             f"{where} is a lone surrogate (not a character); the record was dropped")
                    continue
            yield line_no, rec
    except ReadError as err:
        on_error(err.reason, line_no + 1, err.detail)


# ----------------------------------------------------------------------------------------------------------------------
# writing shards


class ShardWriter:
    """Writes documents as JSON lines into one zstd-compressed shard, atomically (temp name, then rename)."""

    def __init__(self, path: str | os.PathLike, level: int = 3) -> None:
        self.path = Path(path)
        self.count = 0
        self.text_bytes = 0
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._file = open(tmp, "wb")
        self._z = zstandard.ZstdCompressor(level=level).stream_writer(self._file, closefd=False)
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode

    def write(self, doc: Any) -> None:
        d = doc if isinstance(doc, dict) else doc.to_dict()
        line = self._dumps(d)
        try:
            data = line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a file name that is not UTF-8 (os.fsdecode)
            data = line.encode("utf-8", "backslashreplace")
        self._z.write(data + b"\n")
        self.count += 1
        self.text_bytes += len(d["text"].encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        self._z.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        err = RuntimeError("aborted")
        self._ctx.__exit__(RuntimeError, err, None)  # removes the temporary file

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close()
        else:
            self.abort()
        return False


def jsonl_to_parquet(src: str | os.PathLike, dst: str | os.PathLike, row_group_rows: int = 4096) -> int:
    """Convert a ``{id, text, meta}`` JSONL(.zst) shard to Parquet (columns ``id``, ``text`` and ``meta`` as a JSON
    string, since meta keys differ between documents), streaming, atomically; returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("meta", pa.string())])
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode

    def on_error(reason: str, line: int | None, detail: str) -> None:
        raise ReadError(reason, f"{src}:{line}: {detail}", line)

    rows = 0
    with atomic_path(Path(dst)) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            buf: dict[str, list] = {"id": [], "text": [], "meta": []}

            def flush() -> None:
                if buf["id"]:
                    writer.write_table(pa.table(buf, schema=schema))
                    for v in buf.values():
                        v.clear()

            for _, rec in iter_jsonl(src, on_error):
                buf["id"].append(str(rec["id"]))
                buf["text"].append(rec["text"])
                buf["meta"].append(dumps(rec.get("meta") or {}))
                rows += 1
                if len(buf["id"]) >= row_group_rows:
                    flush()
            flush()
    return rows


def iter_parquet(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, record)`` for the rows of a Parquet file; a JSON-string ``meta`` column is decoded."""
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            if isinstance(rec.get("meta"), str):
                rec["meta"] = json.loads(rec["meta"])
            yield row, rec
            row += 1


# ----------------------------------------------------------------------------------------------------------------------
# reading documents (the API later stages use)


def _warn(path: Path) -> ErrorHandler:
    from rich.markup import escape

    from lmforge.progress import console

    def on_error(reason: str, line: int | None, detail: str) -> None:
        console.print(f"[yellow]⚠ {reason}[/] {escape(str(path))}:{line or '?'}: {escape(detail)}")

    return on_error


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The shard files behind ``path``: a data artifact's ``docs/part-*.jsonl.zst`` or ``docs/part-*.parquet`` (kept
    documents), or the JSONL(.gz/.zst) and Parquet files of a file, folder or glob."""
    p = Path(path)
    if p.is_dir() and (is_artifact(p) or (p / "docs").is_dir()):
        if is_artifact(p):
            m = read_manifest(p)
            if m.status != "done":
                raise ValueError(f"{p} is an unfinished {m.stage} artifact (status {m.status}); run it first")
        return sorted((p / "docs").glob("part-*.jsonl.zst")) or sorted((p / "docs").glob("part-*.parquet"))
    files = [f for f in expand_paths(path) if f.name.endswith(JSONL_SUFFIXES + (".parquet",))]
    if not files:
        raise FileNotFoundError(f"{path}: no data artifact and no JSONL(.gz/.zst) or Parquet file there")
    return files


def iter_documents(path: str | os.PathLike, on_error: ErrorHandler | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"id", "text", "meta"}`` dicts from a data artifact folder (its kept documents, in shard order) or from
    JSONL(.gz/.zst) / Parquet files (a file, folder or glob).

    Records without a string ``text`` are skipped; other top-level fields of a foreign record go into ``meta``.
    Bad lines are reported to ``on_error(reason, line, detail)`` (default: a yellow warning naming file and line).
    """
    for f in shard_files(path):
        handler = on_error or _warn(f)
        records = iter_parquet(f) if f.name.endswith(".parquet") else iter_jsonl(f, handler)
        for line_no, rec in records:
            text = rec.get("text")
            if not isinstance(text, str):
                handler("read_error:missing_text", line_no, "no string 'text' field")
                continue
            meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
            extra = {k: v for k, v in rec.items() if k not in ("id", "text", "meta")}
            if extra:
                meta = {**extra, **meta}
            yield {"id": str(rec.get("id", f"{f}:{line_no}")), "text": text, "meta": meta}


def iter_texts(path: str | os.PathLike) -> Iterator[str]:
    """Just the texts of :func:`iter_documents`."""
    for d in iter_documents(path):
        yield d["text"]
