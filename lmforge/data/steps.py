"""Pipeline steps: small objects with one method over a stream of documents.

A step is called on an iterable of :class:`Document` and yields every document it was given, in order: kept ones
(possibly changed) and dropped ones, marked with ``meta["drop_reason"]`` / ``meta["drop_step"]``.  A document that an
earlier step dropped passes through untouched and uncounted, so steps compose freely::

    docs = read(...)
    for step in (HtmlExtract(), UnicodeNormalize(), GopherRepetition(), GopherQuality()):
        docs = step(docs)
    for doc in docs: ...  # doc.dropped tells where it goes

Each step counts what it saw in ``step.stats`` (documents in, kept, dropped by reason), and the executor checks
conservation: in = kept + dropped.  Names carry a version (``html_extract_v1``): bump it when a step's output changes
so manifests say exactly what ran.  Filters put their scores in ``meta`` so thresholds can be re-tuned later.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from lmforge.data.documents import Document


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    added: int = 0
    """Documents a step made besides the ones it was given (a mixed-language document split in two adds one)."""
    tallies: dict[str, Counter] = field(default_factory=dict)
    """Named counters a step keeps beside in/kept/dropped, e.g. ``tallies["lang"]["en"]``, ``tallies["pii"]["email"]``."""

    def tally(self, table: str, key: str, n: int = 1) -> None:
        self.tallies.setdefault(table, Counter())[key] += n

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """Counts; ``full`` adds the time spent in the step and its tallies."""
        d: dict[str, Any] = {"name": self.name, "in": self.docs_in, "kept": self.kept,
                             "dropped": dict(sorted(self.dropped.items()))}
        if self.added:
            d["added"] = self.added
        if full:
            d["seconds"] = round(self.seconds, 4)
            d["tallies"] = {k: dict(sorted(v.items())) for k, v in sorted(self.tallies.items())}
        return d

    def check(self) -> None:
        if self.docs_in + self.added != self.kept + sum(self.dropped.values()):
            raise AssertionError(
                f"conservation violated in {self.name}: {self.docs_in} in + {self.added} added != {self.kept} kept + "
                f"{sum(self.dropped.values())} dropped"
            )


def count_lang(stats: StepStats, doc: Document, reason: str | None) -> None:
    """Per-language outcome of one document in one step (once its language is known): tallies ``lang_kept`` and
    ``lang_dropped`` (language → documents) and ``lang_drop_reason`` (``"zh: stop_words"`` → documents)."""
    lang = doc.meta.get("lang")
    if lang is None:
        return
    if reason is None:
        stats.tally("lang_kept", lang)
    else:
        stats.tally("lang_dropped", lang)
        stats.tally("lang_drop_reason", f"{lang}: {reason}")


class Step:
    """Base class: override :meth:`process` (return the document, changed or not, or a drop reason string)."""

    name = "step_v0"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def process(self, doc: Document) -> Document | str | list[Document]:
        """The document (changed or not), a drop reason, or a list: the document followed by new ones made from it
        (counted as kept, the new ones also as ``added``)."""
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        stats = self.stats
        clock = time.perf_counter
        for doc in docs:
            if doc.dropped:
                yield doc
                continue
            stats.docs_in += 1
            t0 = clock()
            out = self.process(doc)
            stats.seconds += clock() - t0
            if isinstance(out, str):
                stats.dropped[out] += 1
                count_lang(stats, doc, out)
                yield doc.drop(self.name, out)
            elif isinstance(out, list):
                stats.kept += len(out)
                stats.added += len(out) - 1
                for d in out:
                    count_lang(stats, d, None)
                    yield d
            else:
                stats.kept += 1
                count_lang(stats, out, None)
                yield out


# ----------------------------------------------------------------------------------------------------------------------
# HTML → text


class HtmlExtract(Step):
    """Main-content text of HTML documents (``meta.format == "html"``); other documents pass unchanged.

    ``resiliparse`` (default, fast) or ``trafilatura`` (optional extra).  When the main-content heuristic leaves
    nothing, the full page text is used instead (``meta.extract_fallback``) and the quality filters judge it; drops
    ``html_no_text`` when even that is empty, ``extract_error`` when the extractor raises (``meta.extract_error``).
    Records ``meta.title`` and ``meta.extractor``.

    ``timeout`` > 0 runs the extractor in a helper process (see :class:`ExtractSandbox`): a page that takes longer is
    dropped as ``extract_timeout`` and the helper is replaced, so a pathological page never hangs the run, even inside
    the extractor's C code where a signal could not interrupt it.
    """

    name = "html_extract_v1"

    def __init__(self, extractor: str = "resiliparse", main_content: bool = True, timeout: float = 0.0) -> None:
        super().__init__()
        self.extractor = extractor
        self.main_content = main_content
        self.timeout = timeout
        self._sandbox: ExtractSandbox | None = None
        if extractor == "resiliparse":
            from resiliparse.extract.html2text import extract_plain_text
            from resiliparse.parse.html import HTMLTree

            self._extract_plain_text = extract_plain_text
            self._parse = HTMLTree.parse
        elif extractor == "trafilatura":
            try:
                import trafilatura
            except Exception as err:  # ImportError, or lxml 6 without lxml_html_clean
                raise RuntimeError(
                    f"extractor 'trafilatura' is not usable here ({type(err).__name__}: {err}); "
                    "install it with `pip install trafilatura lxml_html_clean`, or use --extractor resiliparse"
                ) from None
            self._trafilatura = trafilatura
        else:
            raise ValueError(f"unknown extractor {extractor!r} (resiliparse or trafilatura)")

    def extract(self, html: str) -> tuple[str, str, bool]:
        """``(title, text, fell_back_to_full_page)`` of one page."""
        fallback = False
        if self.extractor == "resiliparse":
            tree = self._parse(html)
            title = tree.title or ""
            text = self._extract_plain_text(tree, main_content=self.main_content, alt_texts=False)
            if self.main_content and not text.strip():
                # resiliparse's boilerplate heuristic sometimes removes a whole real page (e.g. some Django docs
                # pages); fall back to the full page text and let the quality filters judge it
                text = self._extract_plain_text(tree, main_content=False, alt_texts=False)
                fallback = True
        else:
            text = self._trafilatura.extract(html, include_comments=False, favor_recall=True) or ""
            m = re.search(r"<title[^>]*>(.*?)</title>", html, re.I | re.S)
            title = m.group(1).strip() if m else ""
        return title, text, fallback

    def process(self, doc: Document) -> Document | str:
        if doc.meta.get("format") != "html":
            return doc
        try:
            if self.timeout > 0:
                if self._sandbox is None:
                    self._sandbox = ExtractSandbox(self.extract)
                result = self._sandbox.call(doc.text, self.timeout)
                if result is None:
                    doc.meta["extract_timeout_s"] = self.timeout
                    return "extract_timeout"
            else:
                result = self.extract(doc.text)
        except Exception as err:  # a page the extractor cannot handle is dropped, not fatal
            doc.meta["extract_error"] = (str(err) if isinstance(err, ExtractError) else f"{type(err).__name__}: {err}")[:200]
            return "extract_error"
        title, text, fallback = result
        if not text or not text.strip():
            return "html_no_text"
        if fallback:
            doc.meta["extract_fallback"] = "full_page"
        doc.text = text
        doc.meta["format"] = "text"
        doc.meta["extractor"] = self.extractor
        if title:
            doc.meta["title"] = title.strip()
        return doc

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        try:
            yield from super().__call__(docs)
        finally:
            self.close()


class ExtractError(Exception):
    """The extractor raised inside the helper process (the message names the original error)."""


def _serve_extract(conn: Any, fn: Any, owner_end: Any = None) -> None:  # the helper process's loop
    if owner_end is not None:  # the fork copied the owner's end of the pipe: close it, or recv() never sees EOF when
        owner_end.close()      # the owner dies (killed, interrupted) and this helper outlives it forever
    while True:
        try:
            html = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, fn(html)))
        except Exception as err:
            conn.send((False, f"{type(err).__name__}: {err}"))


class ExtractSandbox:
    """Runs ``fn(html)`` in a forked helper process that lives across calls; :meth:`call` gives up after ``timeout``
    seconds, kills the helper and starts a fresh one on the next call.  Costs a pipe round trip per page (tens of µs).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")  # the child inherits the loaded extractor (no re-import)
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_extract, args=(child, self.fn, parent), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def call(self, html: str, timeout: float) -> Any:
        """``fn(html)``, or None when it took longer than ``timeout`` seconds; raises :class:`ExtractError`."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(html)
        if not self.conn.poll(timeout):
            self.close()
            self.restarts += 1
            return None
        try:
            ok, value = self.conn.recv()
        except EOFError:  # the helper died (e.g. a crash inside C code): treat like an error, restart next time
            self.close()
            raise ExtractError("the extractor process died") from None
        if not ok:
            raise ExtractError(value)
        return value

    def close(self) -> None:
        if self.proc is not None:
            self.conn.close()
            self.proc.kill()
            self.proc.join()
            self.proc = self.conn = None


# ----------------------------------------------------------------------------------------------------------------------
# unicode


# C0/C1 control characters except \t and \n, plus zero-width and BOM characters
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\u2060\ufeff]")
_TRAILING_WS = re.compile(r"[ \t\u00a0]+$", re.M)
_MANY_NEWLINES = re.compile(r"\n{3,}")


class UnicodeNormalize(Step):
    """Fix mojibake (ftfy), NFC, drop control / zero-width characters, normalise line ends and trailing space.

    Leading indentation is kept (code), runs of 3+ newlines become 2.  ftfy's fixers run only on text that its
    mojibake detector flags (ASCII text is never checked), which makes this step several times faster on clean text.
    Drops ``empty_after_normalize``.
    """

    name = "unicode_normalize_v1"

    def __init__(self) -> None:
        super().__init__()
        import ftfy
        from ftfy.badness import is_bad

        self._fix = ftfy.fix_text
        self._is_bad = is_bad

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.isascii():
            if self._is_bad(text):  # ftfy's mojibake detector is ~3x faster than running every fixer
                # keep typographic quotes and full-width CJK punctuation: they are information, not damage
                text = self._fix(text, normalization="NFC", unescape_html=False, uncurl_quotes=False,
                                 fix_character_width=False)
            if not unicodedata.is_normalized("NFC", text):
                text = unicodedata.normalize("NFC", text)
        text = _CONTROL.sub("", text)
        text = _TRAILING_WS.sub("", text)
        text = _MANY_NEWLINES.sub("\n\n", text).strip("\n")
        if not text.strip():
            return "empty_after_normalize"
        doc.text = text
        return doc


# ----------------------------------------------------------------------------------------------------------------------
# exact dedup


_NON_WORD = re.compile(r"[\W_]+")


def dedup_key(text: str) -> bytes:
    """Hash of the text with case, punctuation and whitespace differences removed."""
    simplified = _NON_WORD.sub(" ", text.casefold()).strip()
    return hashlib.blake2b(simplified.encode("utf-8"), digest_size=16).digest()


class ExactDedup(Step):
    """Drops ``exact_duplicate`` for every document whose normalised text was seen before (first one wins).

    The executor runs it in one final pass over all shards in shard order, so it is global and deterministic; the
    memory is 16 bytes per distinct document.  ``meta.duplicate_of`` names the id of the kept copy.
    """

    name = "exact_dedup_v1"

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[bytes, str] = {}

    def process(self, doc: Document) -> Document | str:
        key = dedup_key(doc.text)
        first = self.seen.get(key)
        if first is not None:
            doc.meta["duplicate_of"] = first
            return "exact_duplicate"
        self.seen[key] = doc.id
        return doc


class BatchStep(Step):
    """A step that decides on batches of documents (a model is much faster on 64 texts at once than on one at a time).

    Override :meth:`process_batch`; order, pass-through of dropped documents and the counts are the same as
    :class:`Step`'s.
    """

    batch_size = 64

    def process_batch(self, docs: list[Document]) -> list[Document | str]:
        raise NotImplementedError

    def process(self, doc: Document) -> Document | str:
        return self.process_batch([doc])[0]

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        buf: list[Document] = []
        for doc in docs:
            buf.append(doc)
            if len(buf) >= self.batch_size:
                yield from self._flush(buf)
                buf = []
        if buf:
            yield from self._flush(buf)

    def _flush(self, buf: list[Document]) -> list[Document]:
        stats = self.stats
        live = [d for d in buf if not d.dropped]
        t0 = time.perf_counter()
        outs = self.process_batch(live) if live else []
        stats.seconds += time.perf_counter() - t0
        stats.docs_in += len(live)
        decided = iter(outs)
        result = []
        for doc in buf:
            if doc.dropped:
                result.append(doc)
                continue
            out = next(decided)
            if isinstance(out, str):
                stats.dropped[out] += 1
                count_lang(stats, doc, out)
                result.append(doc.drop(self.name, out))
            else:
                stats.kept += 1
                count_lang(stats, out, None)
                result.append(out)
        return result
