"""Is this file text, and in which encoding?  Shared by the data readers and RAG ingest.

* :func:`sniff_binary` says why bytes are not text: the magic number of a common binary format (PNG, JPEG, PDF,
  ZIP/Office, gzip, ELF, ...), NUL bytes (UTF-16/32 with a byte-order mark excepted) or many control characters.
* :func:`decode_text` decodes text: UTF-8 (BOM or not) first, UTF-16/32 by their BOM, then a file whose lines mix
  UTF-8 and one legacy encoding line by line (:func:`decode_mixed_lines`), else the encoding charset-normalizer finds (when Windows-1252 fits as well as its first guess, Windows-1252: the legacy encoding of
  most English and Western European text).  Bytes that fit no encoding are binary.
* :func:`find_surrogate` finds a lone surrogate (``"\\ud800"`` from a JSON escape or CESU-8 bytes), which no UTF-8
  writer can encode.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

SNIFF_BYTES = 8192
MAX_CONTROL_FRACTION = 0.02  # of the first SNIFF_BYTES; random bytes have ~10 %, text ~0

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"%PDF-", "PDF"), (b"PK\x03\x04", "ZIP"), (b"PK\x05\x06", "ZIP"), (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh91AY&SY", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "RAR"), (b"\x7fELF", "ELF"), (b"\xca\xfe\xba\xbe", "Java class/Mach-O"),
    (b"\xcf\xfa\xed\xfe", "Mach-O"), (b"SQLite format 3\x00", "SQLite"), (b"OggS", "Ogg"), (b"fLaC", "FLAC"),
    (b"wOFF", "WOFF"), (b"wOF2", "WOFF2"), (b"\x00asm", "WebAssembly"), (b"PAR1", "Parquet"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "OLE2 (old MS Office)"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# C0 controls other than \t \n \v \f \r and ESC (ANSI colours in logs), and DEL
_CONTROL = bytes([*range(0, 9), *range(14, 27), *range(28, 32), 127])


def _bom(data: bytes) -> str | None:
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return enc
    return None


def sniff_binary(data: bytes) -> str | None:
    """Why ``data`` is a binary file (e.g. ``"PNG file (magic number)"``), or None if it may be text."""
    head = data[:SNIFF_BYTES]
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return f"{name} file (magic number {magic[:4]!r})"
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI ", b"WEBP"):
        return f"{head[8:12].decode().strip()} file (magic number b'RIFF')"
    if head[4:8] == b"ftyp":
        return "MP4/QuickTime file (magic number b'ftyp')"
    if _bom(head):
        return None
    if b"\x00" in head:
        return f"NUL byte at offset {head.index(0)}"
    control = len(head) - len(head.translate(None, _CONTROL))
    if head and control / len(head) > MAX_CONTROL_FRACTION:
        return f"{control / len(head):.0%} control characters"
    return None


def invalid_utf8_fraction(data: bytes) -> float:
    """Fraction of the first SNIFF_BYTES bytes that are not part of a valid UTF-8 sequence."""
    head = data[:SNIFF_BYTES]
    if not head:
        return 0.0
    return head.decode("utf-8", "replace").count("\ufffd") / len(head)


def decode_text(data: bytes) -> tuple[str | None, str]:
    """``(text, encoding)``: the text and the encoding assumed (``utf-8``, ``cp1252``, ...); ``(None, why)`` when
    the bytes are binary or fit no text encoding."""
    why = sniff_binary(data)
    if why:
        return None, f"binary: {why}"
    bom = _bom(data)
    if bom:
        try:
            return data.decode(bom), bom.replace("-sig", "")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    mixed = decode_mixed_lines(data)
    if mixed is not None:
        return mixed
    import charset_normalizer

    results = list(charset_normalizer.from_bytes(data))
    if not results:
        return None, (f"binary: {invalid_utf8_fraction(data):.0%} of the bytes are not UTF-8 and no other text "
                      "encoding fits")
    best = results[0]
    enc = best.encoding
    ties = [m for m in results if m.chaos <= best.chaos + 0.01 and m.coherence >= best.coherence - 0.01]
    if enc != "cp1252" and any("cp1252" in m.could_be_from_charset for m in ties):
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            pass
    return str(best), enc

def decode_mixed_lines(data: bytes) -> tuple[str, str] | None:
    """A file whose lines are in two encodings (UTF-8 lines and lines of one legacy encoding, e.g. a log or a
    concatenation of GBK and UTF-8 files): ``(text, "utf-8+<encoding>")``, each line decoded in its own encoding;
    None when the bytes are not like that (no non-ASCII line is valid UTF-8, or the other lines fit no encoding)."""
    lines = data.split(b"\n")
    utf8, other = [], []
    for i, line in enumerate(lines):
        if line.isascii():
            continue
        try:
            line.decode("utf-8")
            utf8.append(i)
        except UnicodeDecodeError:
            other.append(i)
    if not utf8 or not other:
        return None
    import charset_normalizer

    best = charset_normalizer.from_bytes(b"\n".join(lines[i] for i in other)).best()
    if best is None:
        return None
    enc = best.encoding
    out = []
    for line in lines:
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(line.decode(enc, "replace"))
    return "\n".join(out), f"utf-8+{enc}"


_SURROGATE = re.compile("[\ud800-\udfff]")
# a \uD800-\uDFFF escape in JSON, or the first byte pair of a CESU-8 encoded surrogate
_RAW_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")


def maybe_surrogate(raw: bytes) -> bool:
    """Cheap pre-check on a raw JSON line: could it decode to a lone surrogate?"""
    return _RAW_SURROGATE.search(raw) is not None


def find_surrogate(value: Any, path: str = "") -> str | None:
    """Where in ``value`` (a str, or nested dicts/lists of them) a lone surrogate sits: e.g. ``"field 'text'
    character 12 (U+D800)"``; None if there is none."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m:
            return f"field {path or 'value'!r} character {m.start() + 1} (U+{ord(m.group()):04X})"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            where = find_surrogate(k, f"{path}.<key>" if path else "<key>") or find_surrogate(
                v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where = find_surrogate(v, f"{path}[{i}]")
            if where:
                return where
    return None
