"""Rule filters from Gopher (Rae et al. 2021, appendix A) as used for MassiveText, C4-style corpora and datatrove.

Words are counted with one precompiled regex: a run of non-space characters, except that each CJK ideograph or kana
is a word of its own and CJK punctuation separates words (Chinese and Japanese have no spaces), so word-count rules
treat CJK text fairly.  Rules that only
make sense for space-separated languages (mean word length, stop words) look at the non-CJK words only and are
skipped for mostly-CJK documents.

Scores go into ``meta["scores"]`` (rounded), so a different threshold can be tried on the output without recomputing.
"""

from __future__ import annotations

import re

import numpy as np

from lmforge.data.documents import Document
from lmforge.data.steps import Step

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# CJK and full-width punctuation (、。「」，：？ …) separates words like a space does
_CJK_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
WORD_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}{_CJK_PUNCT}]+")
CJK_RE = re.compile(f"[{_CJK}]")
# a whitespace-separated token without any letter (digits, punctuation, symbols)
NON_ALPHA_TOKEN_RE = re.compile(f"(?<![^\\s{_CJK_PUNCT}])(?:[^\\w\\s{_CJK_PUNCT}]|[\\d_])+(?![^\\s{_CJK_PUNCT}])")
PARA_SPLIT = re.compile(r"\n{2,}")
LINE_SPLIT = re.compile(r"\n+")

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "◦", "·", "–", "▪")
ELLIPSES = ("...", "…")


def words(text: str) -> list[str]:
    """Word tokens (CJK characters count one each)."""
    return WORD_RE.findall(text)


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in them)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


_HASH_MUL = np.uint64(0x100000001B3)


class NGrams:
    """N-gram statistics of one word list, vectorised: each word is hashed once, an n-gram's hash is built from the
    (n-1)-gram's (``h * P + w``, wrapping uint64), and repeats are found with ``np.unique`` instead of a Python loop
    over every position."""

    def __init__(self, toks: list[str]) -> None:
        self.n_words = len(toks)
        self.word_hash = np.fromiter(map(hash, toks), dtype=np.int64, count=len(toks)).view(np.uint64)
        self.cum_len = np.zeros(len(toks) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)), out=self.cum_len[1:])
        self._hashes = {1: self.word_hash}

    def hashes(self, n: int) -> np.ndarray:
        """Hash of the n-gram starting at each position (length n_words - n + 1)."""
        if n not in self._hashes:
            prev = self.hashes(n - 1)
            self._hashes[n] = prev[:-1] * _HASH_MUL + self.word_hash[n - 1 :]
        return self._hashes[n]

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent n-gram, all its occurrences (words joined by a space)."""
        if self.n_words < n:
            return 0
        _, first, counts = np.unique(self.hashes(n), return_index=True, return_counts=True)
        c = int(counts.max())
        if c <= 1:
            return 0
        i = int(first[counts == c].min())  # ties: the n-gram that occurs first (independent of hash values)
        return (int(self.cum_len[i + n] - self.cum_len[i]) + n - 1) * c

    def dup_chars(self, n: int) -> int:
        """Characters in n-grams that repeat an earlier n-gram, scanning left to right and jumping over a repeat
        (Gopher; the same walk as datatrove's ``find_all_duplicate``).  Only positions whose n-gram occurs more than
        once can change the walk, so the Python loop runs over those alone."""
        if self.n_words < n:
            return 0
        h = self.hashes(n)
        _, inv, counts = np.unique(h, return_inverse=True, return_counts=True)
        cand = np.flatnonzero(counts[inv] > 1)
        if cand.size == 0:
            return 0
        seen: set[int] = set()
        chars, next_free = 0, 0
        cum = self.cum_len
        for i, g in zip(cand.tolist(), h[cand].tolist()):
            if i < next_free:
                continue  # jumped over by the previous repeat
            if g in seen:
                chars += int(cum[i + n] - cum[i])
                next_free = i + n
            else:
                seen.add(g)
        return chars


class GopherRepetition(Step):
    """Drops documents made of repeated lines, paragraphs or n-grams (boilerplate, spam, link lists).

    Defaults are Gopher's: duplicate lines ≤ 30 % (by count) and ≤ 20 % (by characters), the same for paragraphs; the
    top 2/3/4-gram covers ≤ 20/18/16 % of characters; duplicated 5…10-grams cover ≤ 15…10 %.  Character fractions
    are of the whole text, as in Gopher and datatrove.
    """

    name = "gopher_repetition_v1"

    def __init__(
        self,
        max_dup_line_frac: float = 0.30,
        max_dup_para_frac: float = 0.30,
        max_dup_line_char_frac: float = 0.20,
        max_dup_para_char_frac: float = 0.20,
        top_ngram_fracs: tuple[float, ...] = (0.20, 0.18, 0.16),
        dup_ngram_fracs: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10),
    ) -> None:
        super().__init__()
        self.max_dup_line_frac = max_dup_line_frac
        self.max_dup_para_frac = max_dup_para_frac
        self.max_dup_line_char_frac = max_dup_line_char_frac
        self.max_dup_para_char_frac = max_dup_para_char_frac
        self.top_ngram_fracs = tuple(top_ngram_fracs)  # n = 2, 3, 4 ...
        self.dup_ngram_fracs = tuple(dup_ngram_fracs)  # n = 5, 6, 7 ...

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        n_chars = len(text) or 1
        scores = doc.meta.setdefault("scores", {})
        reason = None

        paras = [p for p in PARA_SPLIT.split(text.strip()) if p.strip()]
        n_dup, dup_chars = _dup_stats(paras)
        s_para, s_para_chars = n_dup / max(len(paras), 1), dup_chars / n_chars
        lines = [ln for ln in LINE_SPLIT.split(text) if ln.strip()]
        n_dup, dup_chars = _dup_stats(lines)
        s_line, s_line_chars = n_dup / max(len(lines), 1), dup_chars / n_chars
        scores.update(dup_para_frac=round(s_para, 4), dup_para_char_frac=round(s_para_chars, 4),
                      dup_line_frac=round(s_line, 4), dup_line_char_frac=round(s_line_chars, 4))
        if s_para > self.max_dup_para_frac:
            reason = "dup_para_frac"
        elif s_para_chars > self.max_dup_para_char_frac:
            reason = "dup_para_char_frac"
        elif s_line > self.max_dup_line_frac:
            reason = "dup_line_frac"
        elif s_line_chars > self.max_dup_line_char_frac:
            reason = "dup_line_char_frac"

        grams = NGrams(WORD_RE.findall(text))
        for n, limit in enumerate(self.top_ngram_fracs, start=2):
            s = grams.top_chars(n) / n_chars
            scores[f"top_{n}gram_frac"] = round(s, 4)
            if reason is None and s > limit:
                reason = f"top_{n}gram_frac"
        for n, limit in enumerate(self.dup_ngram_fracs, start=5):
            s = grams.dup_chars(n) / n_chars
            scores[f"dup_{n}gram_frac"] = round(s, 4)
            if reason is None and s > limit:
                reason = f"dup_{n}gram_frac"
        return reason or doc


class GopherQuality(Step):
    """Drops documents that do not look like prose: too short or long, too many symbols, mostly bullet or ellipsis
    lines, odd mean word length, too few words with letters, no English stop words.

    Gopher's defaults: 50 ≤ words ≤ 100,000; mean word length 3…10; '#' and ellipses per word ≤ 0.1; bullet lines
    ≤ 90 %; lines ending in an ellipsis ≤ 30 %; words with a letter ≥ 80 %; at least 2 of the stop words
    {the, be, to, of, and, that, have, with} (English-only: set ``min_stop_words=0`` for other languages).
    """

    name = "gopher_quality_v1"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_mean_word_length: float = 3.0,
        max_mean_word_length: float = 10.0,
        max_symbol_word_ratio: float = 0.1,
        max_bullet_lines_frac: float = 0.9,
        max_ellipsis_lines_frac: float = 0.3,
        min_alpha_words_frac: float = 0.8,
        min_stop_words: int = 2,
    ) -> None:
        super().__init__()
        self.min_words = min_words
        self.max_words = max_words
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_frac = max_bullet_lines_frac
        self.max_ellipsis_lines_frac = max_ellipsis_lines_frac
        self.min_alpha_words_frac = min_alpha_words_frac
        self.min_stop_words = min_stop_words

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        toks = WORD_RE.findall(text)
        n = len(toks)
        n_cjk = len(CJK_RE.findall(text))
        latin = n - n_cjk
        mostly_cjk = n_cjk > latin
        scores = doc.meta.setdefault("scores", {})
        scores["words"] = n
        if n < self.min_words:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"

        symbols = text.count("#") + text.count("...") + text.count("…")
        symbol_ratio = symbols / n
        lines = [ln.strip() for ln in text.split("\n")]
        lines = [ln for ln in lines if ln]
        n_lines = len(lines) or 1
        bullet = sum(1 for ln in lines if ln.startswith(BULLETS)) / n_lines
        ellipsis = sum(1 for ln in lines if ln.endswith(ELLIPSES)) / n_lines
        alpha = 1.0 - len(NON_ALPHA_TOKEN_RE.findall(text)) / n
        mean_len = (sum(map(len, toks)) - n_cjk) / latin if latin else 0.0
        stop = len(STOP_WORDS.intersection(text.lower().split())) if not mostly_cjk else None
        scores.update(symbol_word_ratio=round(symbol_ratio, 4), bullet_lines_frac=round(bullet, 4),
                      ellipsis_lines_frac=round(ellipsis, 4), alpha_words_frac=round(alpha, 4),
                      mean_word_length=round(mean_len, 3))
        if stop is not None:
            scores["stop_words"] = stop

        if symbol_ratio > self.max_symbol_word_ratio:
            return "symbol_word_ratio"
        if bullet > self.max_bullet_lines_frac:
            return "bullet_lines"
        if ellipsis > self.max_ellipsis_lines_frac:
            return "ellipsis_lines"
        if alpha < self.min_alpha_words_frac:
            return "alpha_words_frac"
        if not mostly_cjk:
            if not self.min_mean_word_length <= mean_len <= self.max_mean_word_length:
                return "mean_word_length"
            if stop is not None and stop < self.min_stop_words:
                return "stop_words"
        return doc
