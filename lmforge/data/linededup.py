"""Corpus-wide removal of repeated lines or paragraphs (CCNet-style boilerplate removal), in bounded memory.

Navigation bars, cookie notices, footers and copyright lines repeat on page after page of a site; any single page
looks fine to the per-document filters.  This step finds them by counting, over the whole corpus, in how many
documents each (normalised) line occurs, and removes the lines found in more than ``max_docs`` documents.

1. **Count** (per shard, in the workers): every kept document's distinct lines are normalised (case-folded, digits
   → 0, punctuation and extra whitespace removed, as CCNet does) and hashed to 64 bits; the shard writes
   ``work/part-i.lines.npy``: its distinct hashes, sorted, with the number of documents holding each.
2. **Merge** (once): the shards' sorted tables are merged one hash range at a time (``buckets`` slices of the 64-bit
   space, read with ``mmap``), so memory is about a ``1/buckets`` share of the tables; only the hashes with a total
   above ``max_docs`` are kept — boilerplate, a small set.
3. **Remove** (final pass, before exact dedup): lines whose hash is in that set are deleted from each document;
   ``meta.repeated_units_removed`` / ``meta.repeated_chars_removed`` record what went, and a document left with fewer
   than ``min_words`` words is dropped as ``too_short_after_line_dedup``.

Lines whose normalised form is empty (blank lines, lines of punctuation only) are never counted nor removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.data.documents import Document
from lmforge.data.filters import WORD_RE
from lmforge.data.steps import Step

_DIGITS = re.compile(r"\d")
_PUNCT = re.compile(r"[^\w\s]+|_+")
_SPACES = re.compile(r"\s+")
_PARA_SPLIT = re.compile(r"(\n\s*\n)")
_COMPACT_AT = 1 << 20  # hashes buffered per shard before they are folded into the (hash, count) table
TOP_EXAMPLES = 20  # the most removed units whose counts the stats keep (global_pass.merge_shard_results)


def normalize_unit(text: str) -> str:
    """CCNet's normalisation: case-fold, digits → 0, punctuation removed, whitespace collapsed."""
    return _SPACES.sub(" ", _PUNCT.sub(" ", _DIGITS.sub("0", text.casefold()))).strip()


@dataclass(frozen=True)
class LineDedupParams:
    """What counts as a unit, and when one is boilerplate."""

    unit: Literal["line", "paragraph"] = "line"
    max_docs: int = 10
    """A unit found in more than this many documents is removed."""
    min_words: int = 50
    """A document left with fewer words (CJK characters count one each) is dropped."""

    def split(self, text: str) -> list[str]:
        """The document as a list of pieces that join back to ``text``: units and, between them, separators."""
        if self.unit == "line":
            return text.split("\n")
        if self.unit == "paragraph":
            return _PARA_SPLIT.split(text)
        raise ValueError(f"unknown line-dedup unit {self.unit!r} (line or paragraph)")

    def hashes(self, text: str) -> np.ndarray:
        """Distinct 64-bit hashes of the document's non-empty normalised units (sorted, uint64)."""
        import xxhash

        h = xxhash.xxh64_intdigest
        keys = {h(n.encode("utf-8")) for u in self.split(text) if (n := normalize_unit(u))}
        return np.array(sorted(keys), dtype=np.uint64)


class HashCounter:
    """Counts, per hash, the documents holding it; buffers raw hashes and folds them into a sorted table."""

    def __init__(self) -> None:
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.uint64)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def add(self, doc_hashes: np.ndarray) -> None:
        self._buffer.append(doc_hashes)
        self._buffered += len(doc_hashes)
        if self._buffered >= _COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        if not self._buffer:
            return
        fresh = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        keys = np.concatenate([self.hashes, fresh])
        weights = np.concatenate([self.counts, np.ones(len(fresh), dtype=np.uint64)])
        self.hashes, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=weights, minlength=len(self.hashes)).astype(np.uint64)

    def table(self) -> np.ndarray:
        """``(n, 2)`` uint64: sorted distinct hashes and their document counts."""
        self._compact()
        return np.stack([self.hashes, self.counts], axis=1) if len(self.hashes) else np.zeros((0, 2), np.uint64)


def frequent_hashes(table_files: list[Path], max_docs: int, buckets: int = 16) -> np.ndarray:
    """The sorted hashes whose document count, summed over the shards' tables, is above ``max_docs``."""
    found = [frequent_in_bucket(table_files, max_docs, b, buckets) for b in range(buckets)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.uint64)


def frequent_in_bucket(table_files: list[Path], max_docs: int, bucket: int, buckets: int) -> np.ndarray:
    """:func:`frequent_hashes` for one of ``buckets`` slices of the 64-bit hash space (memory: about that share of the
    tables, read with mmap); the slices are independent tasks for a distributed executor."""
    lo, hi = bucket * 2**64 // buckets, (bucket + 1) * 2**64 // buckets
    parts_h, parts_c = [], []
    for f in table_files:
        t = np.load(f, mmap_mode="r")
        if not len(t):
            continue
        col = t[:, 0]
        a = int(np.searchsorted(col, np.uint64(lo), side="left"))
        b = len(col) if hi >= 2**64 else int(np.searchsorted(col, np.uint64(hi), side="left"))
        parts_h.append(np.asarray(t[a:b, 0]))
        parts_c.append(np.asarray(t[a:b, 1]))
    if not parts_h:
        return np.zeros(0, dtype=np.uint64)
    keys, inverse = np.unique(np.concatenate(parts_h), return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate(parts_c), minlength=len(keys))
    return keys[totals > max_docs]


class RepeatedLineRemoval(Step):
    """Removes the units whose hash is in ``frequent`` (from :func:`frequent_hashes`); drops documents left with
    fewer than ``params.min_words`` words as ``too_short_after_line_dedup``."""

    name = "line_dedup_v1"

    def __init__(self, frequent: np.ndarray, params: LineDedupParams = LineDedupParams()) -> None:
        super().__init__()
        import xxhash

        self.frequent = np.sort(np.asarray(frequent, dtype=np.uint64))
        self.params = params
        self._hash = xxhash.xxh64_intdigest

    def _is_frequent(self, h: int) -> bool:
        i = int(np.searchsorted(self.frequent, np.uint64(h)))
        return i < len(self.frequent) and int(self.frequent[i]) == h

    def process(self, doc: Document) -> Document | str:
        if not len(self.frequent):
            return doc
        pieces = self.params.split(doc.text)
        kept: list[str] = []
        removed = removed_chars = 0
        step = 2 if self.params.unit == "paragraph" else 1  # paragraph pieces alternate unit, separator
        for k, piece in enumerate(pieces):
            if k % step == 0 and (n := normalize_unit(piece)) and self._is_frequent(self._hash(n.encode("utf-8"))):
                removed += 1
                removed_chars += len(piece)
                self._tally_example(piece.strip())
                if step == 2 and kept:
                    kept.pop()  # the separator before a removed paragraph goes with it
                continue
            kept.append(piece)
        if not removed:
            return doc
        text = ("\n".join(kept) if step == 1 else "".join(kept)).strip("\n")
        text = re.sub(r"\n{3,}", "\n\n", text)
        doc.meta["repeated_units_removed"] = removed
        doc.meta["repeated_chars_removed"] = removed_chars
        self.stats.tally("removed", self.params.unit, removed)
        self.stats.tally("removed", "chars", removed_chars)
        doc.text = text
        if len(WORD_RE.findall(text)) < self.params.min_words:
            return "too_short_after_line_dedup"
        return doc

    def _tally_example(self, unit: str) -> None:
        self.stats.tally("top_removed", unit[:80])  # every removed unit is a frequent one: a bounded set
