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
from collections import Counter

import numpy as np

from lmforge.data.documents import Document
from lmforge.data.langprofiles import LangProfiles, Profiled
from lmforge.data.steps import Step
from lmforge.data.wordsplit import jieba_words, japanese_words, sentence_count, spacy_words

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# CJK and full-width punctuation (、。「」，：？ …) separates words like a space does
_CJK_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
WORD_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}{_CJK_PUNCT}]+")
CJK_RE = re.compile(f"[{_CJK}]")
PARA_SPLIT = re.compile(r"\n{2,}")
LINE_SPLIT = re.compile(r"\n+")

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
ELLIPSES = ("...", "…")


# datatrove's PUNCTUATION string: a token made only of these is a "symbol word" (not counted by the word-count rules)
PUNCTUATION_SET = frozenset(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
)
_HAS_ALPHA = re.compile(r"[^\W\d_]").search
WORD_SPLITS = ("spacy", "whitespace", "chars", "jieba", "japanese", "jieba+spacy", "japanese+spacy")


def words(text: str, split: str = "spacy") -> list[str]:
    """Word tokens (CJK characters count one each): ``spacy`` splits punctuation off words as spaCy / datatrove do
    (see :mod:`lmforge.data.wordsplit`); ``whitespace`` keeps whitespace-separated chunks whole (``chars`` is the
    same: one word per CJK character); ``jieba`` / ``japanese`` segment the CJK runs into Chinese / Japanese words
    and keep the other runs whole (``+spacy``: split them like spaCy and count CJK punctuation marks as words)."""
    if split == "spacy":
        return spacy_words(text)
    if split in ("whitespace", "chars"):
        return WORD_RE.findall(text)
    if split.startswith("jieba"):
        return jieba_words(text, split.endswith("+spacy"))
    if split.startswith("japanese"):
        return japanese_words(text, split.endswith("+spacy"))
    raise ValueError(f"unknown word split {split!r} (one of {', '.join(WORD_SPLITS)})")


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
    """N-gram statistics of one word list.

    Short lists (up to ``small`` words, most web documents) use Python sets and counters over word tuples, which beat
    numpy's per-call overhead there.  Long ones are vectorised: each word is hashed once, an n-gram's hash is built
    from the (n-1)-gram's (``h * P + w``, wrapping uint64), and repeats are found with ``np.unique``.  Either way, once
    no n-gram repeats, no longer one can (a repeated (n+1)-gram contains a repeated n-gram), so the rest is skipped.
    """

    small = 1500

    def __init__(self, toks: list[str]) -> None:
        self.toks = toks
        self.n_words = len(toks)
        self.py = self.n_words <= self.small
        self._unique_from = self.n_words + 1  # from this n on no n-gram repeats
        if not self.py:
            self.word_hash = np.fromiter(map(hash, toks), dtype=np.int64, count=len(toks)).view(np.uint64)
            self.cum_len = np.zeros(len(toks) + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)), out=self.cum_len[1:])
            self._hashes = {1: self.word_hash}

    def hashes(self, n: int) -> np.ndarray:
        """Hash of the n-gram starting at each position (length n_words - n + 1; long lists only)."""
        if n not in self._hashes:
            prev = self.hashes(n - 1)
            self._hashes[n] = prev[:-1] * _HASH_MUL + self.word_hash[n - 1 :]
        return self._hashes[n]

    def _grams(self, n: int) -> list[tuple[str, ...]]:
        t = self.toks
        return list(zip(*[t[i:] for i in range(n)]))

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent n-gram, all its occurrences (words joined by a space); 0 when no
        n-gram repeats (datatrove counts the first n-gram once then, which only matters for tiny documents that the
        word-count rule drops anyway)."""
        if self.n_words < n or n >= self._unique_from:
            return 0
        if self.py:
            grams = self._grams(n)
            counts = Counter(grams)
            c = max(counts.values())
            if c == 1:
                self._unique_from = n
                return 0
            g = next(g for g in grams if counts[g] == c)  # ties: the n-gram that occurs first
            return (sum(map(len, g)) + n - 1) * c
        _, first, counts = np.unique(self.hashes(n), return_index=True, return_counts=True)
        c = int(counts.max())
        if c == 1:
            self._unique_from = min(self._unique_from, n)
            return 0
        i = int(first[counts == c].min())  # ties: the n-gram that occurs first (independent of hash values)
        return (int(self.cum_len[i + n] - self.cum_len[i]) + n - 1) * c

    def dup_chars(self, n: int) -> int:
        """Characters in n-grams that repeat an earlier n-gram, scanning left to right and jumping over a repeat
        (Gopher; the same walk as datatrove's ``find_all_duplicate``).  Only positions whose n-gram occurs more than
        once can change the walk, so the loop runs over those alone."""
        if self.n_words < n or n >= self._unique_from:
            return 0
        if self.py:
            grams = self._grams(n)
            counts = Counter(grams)
            if len(counts) == len(grams):
                self._unique_from = n
                return 0
            seen: set = set()
            chars, i, end = 0, 0, len(grams)
            while i < end:
                g = grams[i]
                if counts[g] > 1:
                    if g in seen:
                        chars += sum(map(len, g))
                        i += n
                        continue
                    seen.add(g)
                i += 1
            return chars
        h = self.hashes(n)
        _, inv, counts = np.unique(h, return_inverse=True, return_counts=True)
        cand = np.flatnonzero(counts[inv] > 1)
        if cand.size == 0:
            self._unique_from = min(self._unique_from, n)
            return 0
        seen_h: set[int] = set()
        chars, next_free = 0, 0
        cum = self.cum_len
        for i, g in zip(cand.tolist(), h[cand].tolist()):
            if i < next_free:
                continue  # jumped over by the previous repeat
            if g in seen_h:
                chars += int(cum[i + n] - cum[i])
                next_free = i + n
            else:
                seen_h.add(g)
        return chars


class GopherRepetition(Profiled, Step):
    """Drops documents made of repeated lines, paragraphs or n-grams (boilerplate, spam, link lists).

    Defaults are Gopher's: duplicate lines ≤ 30 % (by count) and ≤ 20 % (by characters), the same for paragraphs; the
    top 2/3/4-gram covers ≤ 20/18/16 % of characters; duplicated 5…10-grams cover ≤ 15…10 %.  Character fractions
    are of the whole text, as in Gopher and datatrove.  Paragraphs and lines are counted as datatrove splits them
    (``\\n\\n+`` / ``\\n+``, blank pieces included); n-grams are of :func:`words` (``word_split``).

    With ``profiles`` (:class:`~lmforge.data.langprofiles.LangProfiles`) a document's ``meta.lang`` picks its
    language's thresholds and word segmentation (FineWeb-2's per-language values).
    """

    name = "gopher_repetition_v2"

    def __init__(
        self,
        max_dup_line_frac: float = 0.30,
        max_dup_para_frac: float = 0.30,
        max_dup_line_char_frac: float = 0.20,
        max_dup_para_char_frac: float = 0.20,
        top_ngram_fracs: tuple[float, ...] = (0.20, 0.18, 0.16),
        dup_ngram_fracs: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10),
        word_split: str = "whitespace",
        profiles: LangProfiles | None = None,
    ) -> None:
        super().__init__()
        words("", word_split)  # validates the name
        self.word_split = word_split
        self.use_profiles(profiles, dict(
            max_dup_line_frac=max_dup_line_frac, max_dup_para_frac=max_dup_para_frac,
            max_dup_line_char_frac=max_dup_line_char_frac, max_dup_para_char_frac=max_dup_para_char_frac,
            top_ngram_fracs=tuple(top_ngram_fracs), dup_ngram_fracs=tuple(dup_ngram_fracs)))
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

        if not text:
            return "empty"
        p, split = self.params(doc)
        paras = PARA_SPLIT.split(text.strip())
        n_dup, dup_chars = _dup_stats(paras)
        s_para, s_para_chars = n_dup / max(len(paras), 1), dup_chars / n_chars
        lines = LINE_SPLIT.split(text)
        n_dup, dup_chars = _dup_stats(lines)
        s_line, s_line_chars = n_dup / max(len(lines), 1), dup_chars / n_chars
        scores.update(dup_para_frac=round(s_para, 4), dup_para_char_frac=round(s_para_chars, 4),
                      dup_line_frac=round(s_line, 4), dup_line_char_frac=round(s_line_chars, 4))
        if s_para > p["max_dup_para_frac"]:
            reason = "dup_para_frac"
        elif s_para_chars > p["max_dup_para_char_frac"]:
            reason = "dup_para_char_frac"
        elif s_line > p["max_dup_line_frac"]:
            reason = "dup_line_frac"
        elif s_line_chars > p["max_dup_line_char_frac"]:
            reason = "dup_line_char_frac"

        if reason is not None:  # as datatrove: stop at the first failed rule (a kept document has every score)
            return reason
        grams = NGrams(words(text, split))
        for n, limit in enumerate(p["top_ngram_fracs"], start=2):
            s = grams.top_chars(n) / n_chars
            scores[f"top_{n}gram_frac"] = round(s, 4)
            if s > limit:
                return f"top_{n}gram_frac"
        for n, limit in enumerate(p["dup_ngram_fracs"], start=5):
            s = grams.dup_chars(n) / n_chars
            scores[f"dup_{n}gram_frac"] = round(s, 4)
            if s > limit:
                return f"dup_{n}gram_frac"
        return doc


class GopherQuality(Profiled, Step):
    """Drops documents that do not look like prose: too short or long, too many symbols, mostly bullet or ellipsis
    lines, odd mean word length, too few words with letters, no English stop words.

    Gopher's defaults: 50 ≤ words ≤ 100,000; mean word length 3…10; '#' per word and ellipses per word ≤ 0.1 each;
    bullet lines ≤ 90 %; lines ending in an ellipsis ≤ 30 %; words with a letter ≥ 80 %; at least 2 of the stop words
    {the, be, to, of, and, that, have, with} (English-only: set ``min_stop_words=0`` for other languages).

    Counted as datatrove counts them: words are :func:`words` tokens (punctuation marks are tokens, so they lower the
    alphabetic-word fraction); the word-count and mean-length rules skip tokens made only of punctuation; line
    fractions are over all lines (blank ones too); bullets are lines starting with ``bullets``; stop words are
    matched as written (lower case).  CJK: mostly-CJK documents skip the mean-length and stop-word rules.

    With ``profiles`` a document's ``meta.lang`` picks its language's thresholds, stop words and word segmentation
    (jieba for Chinese, ...); a rule whose profile value is None is skipped for that language.
    """

    name = "gopher_quality_v2"

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
        word_split: str = "whitespace",
        bullets: tuple[str, ...] = ("•", "-"),
        profiles: LangProfiles | None = None,
    ) -> None:
        super().__init__()
        self.use_profiles(profiles, dict(
            min_words=min_words, max_words=max_words, min_mean_word_length=min_mean_word_length,
            max_mean_word_length=max_mean_word_length, min_alpha_words_frac=min_alpha_words_frac,
            min_stop_words=min_stop_words, stop_words=STOP_WORDS))
        self.min_words = min_words
        self.max_words = max_words
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_frac = max_bullet_lines_frac
        self.max_ellipsis_lines_frac = max_ellipsis_lines_frac
        self.min_alpha_words_frac = min_alpha_words_frac
        self.min_stop_words = min_stop_words
        words("", word_split)
        self.word_split = word_split
        self.bullets = tuple(bullets)
        self._punct = PUNCTUATION_SET | frozenset(TERMINAL_PUNCTUATION)

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        p, split = self.params(doc)
        toks = words(text, split)
        n = len(toks) or 1
        punct = self._punct
        freq = Counter(toks)  # the per-token tests below run once per distinct token
        content = [(w, c) for w, c in freq.items() if w.isalnum() or not punct.issuperset(w)]
        n_content = sum(c for _, c in content)
        scores = doc.meta.setdefault("scores", {})
        scores["words"] = n_content
        if n_content < p["min_words"]:
            return "too_few_words"
        if n_content > p["max_words"]:
            return "too_many_words"

        if p is self._base:  # no language profile: CJK characters are words, mostly-CJK text skips two rules
            n_cjk = len(CJK_RE.findall(text)) if not text.isascii() else 0
            mostly_cjk = n_cjk > n_content - n_cjk
            latin = n_content - n_cjk
            mean_len = (sum(len(w) * c for w, c in content) - n_cjk) / latin if latin > 0 else 0.0
        else:  # the profile's segmentation counts every word alike
            mostly_cjk = False
            mean_len = sum(len(w) * c for w, c in content) / n_content if n_content else 0.0
        lo, hi = p["min_mean_word_length"], p["max_mean_word_length"]
        check_len = not mostly_cjk and lo is not None
        hashes = text.count("#") / n
        ellipses = (text.count("...") + text.count("…")) / n
        lines = text.splitlines() or [""]
        n_lines = len(lines)
        bullet = sum(1 for ln in lines if ln.lstrip().startswith(self.bullets)) / n_lines
        ellipsis = sum(1 for ln in lines if ln.rstrip().endswith(ELLIPSES)) / n_lines
        alpha = sum(c for w, c in freq.items() if w.isalpha() or _HAS_ALPHA(w)) / n
        stop = (len(p["stop_words"].intersection(freq))
                if not mostly_cjk and (p is self._base or p["min_stop_words"]) else None)
        scores.update(symbol_word_ratio=round(max(hashes, ellipses), 4), bullet_lines_frac=round(bullet, 4),
                      ellipsis_lines_frac=round(ellipsis, 4), alpha_words_frac=round(alpha, 4),
                      mean_word_length=round(mean_len, 3))
        if stop is not None:
            scores["stop_words"] = stop

        if check_len and not lo <= mean_len <= hi:
            return "mean_word_length"
        if hashes > self.max_symbol_word_ratio or ellipses > self.max_symbol_word_ratio:
            return "symbol_word_ratio"
        if bullet > self.max_bullet_lines_frac:
            return "bullet_lines"
        if ellipsis > self.max_ellipsis_lines_frac:
            return "ellipsis_lines"
        if alpha < p["min_alpha_words_frac"]:
            return "alpha_words_frac"
        if stop is not None and stop < p["min_stop_words"]:
            return "stop_words"
        return doc


# ----------------------------------------------------------------------------------------------------------------------
# C4 (Raffel et al. 2020) and FineWeb (Penedo et al. 2024) rules, with the published defaults


# Unicode terminal punctuation (the Basic Multilingual Plane part of the Terminal_Punctuation property, as FineWeb uses)
TERMINAL_PUNCTUATION = (
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a\u104b"
    "\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa"
    "\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c"
    "\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f"
    "\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61"
)
# C4 keeps lines ending in . ? ! " ' ; the CJK full stops are added so Chinese and Japanese lines are not all removed
C4_END_PUNCTUATION = (".", "?", "!", '"', "'", "\u3002", "\uff01", "\uff1f", "\u201d", "\u2019")
CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# a sentence ends at . ! ? (or a CJK full stop), possibly followed by closing quotes/brackets, before a space or the end
SENTENCE_END_RE = re.compile("[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\\]]*(?=\\s|$)|[\u3002\uff01\uff1f]")


def count_sentences(line: str) -> int:
    """Sentences in one line: terminal punctuation followed by a space or the end (at least 1 for a non-empty line)."""
    return max(1, len(SENTENCE_END_RE.findall(line))) if line.strip() else 0


class C4Quality(Profiled, Step):
    """C4's rules (as in the T5 code and datatrove's ``C4QualityFilter``): keep only lines that end in terminal
    punctuation and have at least 3 words, drop lines with "javascript", cookie/terms-of-use lines and lines with a
    word over 1,000 characters, remove citation marks like ``[3]``; drop the document for "lorem ipsum", a curly
    bracket, or fewer than 5 sentences left.  The document's text becomes the kept lines.

    CJK-aware: words are counted with :data:`WORD_RE` (one per ideograph) and the CJK full stops end lines and
    sentences.  Sentences are counted as datatrove counts them (spaCy's sentencizer, :func:`sentence_count`) with
    ``word_split="spacy"``, or with a terminal-punctuation regex (:func:`count_sentences`) with ``"whitespace"``.  Removed-line counts go to ``meta.scores.c4_lines_removed``.
    """

    name = "c4_quality_v2"

    def __init__(
        self,
        min_sentences: int = 5,
        min_words_per_line: int = 3,
        max_word_length: int = 1000,
        filter_no_terminal_punct: bool = True,
        remove_citations: bool = True,
        filter_lorem_ipsum: bool = True,
        filter_javascript: bool = True,
        filter_curly_bracket: bool = True,
        filter_policy: bool = True,
        word_split: str = "whitespace",
        profiles: LangProfiles | None = None,
    ) -> None:
        super().__init__()
        words("", word_split)
        self.use_profiles(profiles, dict(line_end="", min_words_per_line=min_words_per_line))
        self._sentences = sentence_count if word_split == "spacy" else count_sentences
        self.min_sentences = min_sentences
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.filter_no_terminal_punct = filter_no_terminal_punct
        self.remove_citations = remove_citations
        self.filter_lorem_ipsum = filter_lorem_ipsum
        self.filter_javascript = filter_javascript
        self.filter_curly_bracket = filter_curly_bracket
        self.filter_policy = filter_policy

    def process(self, doc: Document) -> Document | str:
        kept: list[str] = []
        sentences = 0
        removed = 0
        p, _ = self.params(doc)
        ends = C4_END_PUNCTUATION + tuple(p["line_end"] or ())
        min_words = p["min_words_per_line"]
        for line in doc.text.splitlines():
            line = line.strip()
            if not line:
                continue
            toks = line.split() if line.isascii() else WORD_RE.findall(line)
            if self.max_word_length > 0 and any(len(w) > self.max_word_length for w in toks):
                removed += 1
                continue
            if self.remove_citations:
                line = CITATION_RE.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(ends) or line.endswith("...")):
                removed += 1
                continue
            if len(toks) < min_words:
                removed += 1
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in low:
                removed += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in low for p in POLICY_SUBSTRINGS):
                removed += 1
                continue
            sentences += self._sentences(line)
            kept.append(line)
        doc.meta.setdefault("scores", {}).update(c4_lines_removed=removed, sentences=sentences)
        if sentences < self.min_sentences:
            return "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return doc


class FineWebQuality(Profiled, Step):
    """FineWeb's extra rules (datatrove ``FineWebQualityFilter`` defaults): drop when fewer than 12 % of lines end in
    terminal punctuation, more than 67 % of lines are ≤ 30 characters, more than 1 % of characters are in repeated
    lines, or there are more than 0.3 newlines per word (lists).  Words are :func:`words` tokens (spaCy-like, CJK
    characters one each) without spaCy."""

    name = "fineweb_quality_v2"

    def __init__(
        self,
        line_punct_thr: float = 0.12,
        line_punct_exclude_zero: bool = False,
        short_line_thr: float = 0.67,
        short_line_length: int = 30,
        char_duplicates_ratio: float = 0.01,
        new_line_ratio: float = 0.3,
        word_split: str = "whitespace",
        profiles: LangProfiles | None = None,
    ) -> None:
        super().__init__()
        words("", word_split)
        self.use_profiles(profiles, dict(line_punct_thr=line_punct_thr, short_line_length=short_line_length,
                                         new_line_ratio=new_line_ratio, line_end=""))
        self.word_split = word_split
        self.line_punct_thr = line_punct_thr
        self.line_punct_exclude_zero = line_punct_exclude_zero
        self.short_line_thr = short_line_thr
        self.short_line_length = short_line_length
        self.char_duplicates_ratio = char_duplicates_ratio
        self.new_line_ratio = new_line_ratio
        self._stops = tuple(TERMINAL_PUNCTUATION)

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return "empty"
        scores = doc.meta.setdefault("scores", {})
        p, split = self.params(doc)
        stops = self._stops + tuple(p["line_end"] or ())
        n = len(lines)
        punct = sum(1 for ln in lines if ln.endswith(stops)) / n
        short = sum(1 for ln in lines if len(ln) <= p["short_line_length"]) / n
        dup = _dup_stats(lines)[1] / max(len(text) - text.count("\n"), 1)
        n_tokens = len(words(text, split))
        newline = text.count("\n") / max(n_tokens, 1)
        scores.update(line_punct_ratio=round(punct, 4), short_line_ratio=round(short, 4),
                      char_dup_ratio=round(dup, 4), newline_ratio=round(newline, 4))
        if punct < p["line_punct_thr"] and not (punct == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if short > self.short_line_thr:
            return "short_line_ratio"
        if dup > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if newline > p["new_line_ratio"]:
            return "list_ratio"
        return doc


# ----------------------------------------------------------------------------------------------------------------------
# line-level junk removal


# navigation / consent / call-to-action lines: only whole short lines are removed, never prose that mentions the words
_JUNK_LINE_RE = re.compile(
    r"^\W*(?:"
    r"(?:read|see|show|load|view) (?:more|all|less)|continue reading|click here.*|skip to (?:main )?content|"
    r"back to top|(?:sign|log) ?(?:in|up|out)|register|subscribe.*|share (?:this|on).*|follow us.*|"
    r"(?:accept|allow|reject|manage) (?:all )?cookies?.*|we use cookies.*|this (?:web)?site uses cookies.*|"
    r"cookie (?:settings|policy|preferences)|privacy policy|terms (?:of (?:use|service)|and conditions)|"
    r"all rights reserved.*|(?:©|\(c\)|copyright) .{0,80}|home|menu|search|next|previous|prev|navigation|"
    r"table of contents|print(?: this page)?|loading\.*|advertisement|sponsored"
    r")\W*$",
    re.I,
)


class LineJunk(Step):
    """Removes junk lines: navigation, cookie banners, "read more", copyright footers (whole short lines only),
    symbol-heavy lines (more than ``max_symbol_frac`` of the non-space characters are neither letters nor digits), and
    optionally, as C4 does, every line without terminal punctuation.  Counts per kind go to ``meta.lines_removed`` and
    the step's tallies; drops ``empty_after_line_filter`` when nothing is left."""

    name = "line_junk_v1"

    def __init__(self, max_symbol_frac: float = 0.5, max_junk_line_chars: int = 120,
                 require_terminal_punct: bool = False) -> None:
        super().__init__()
        self.max_symbol_frac = max_symbol_frac
        self.max_junk_line_chars = max_junk_line_chars
        self.require_terminal_punct = require_terminal_punct
        self._stops = tuple(TERMINAL_PUNCTUATION) + ('"', "'", "\u201d", "\u2019")

    def line_kind(self, line: str) -> str | None:
        """Why a (stripped, non-empty) line is junk, or None."""
        if len(line) <= self.max_junk_line_chars and _JUNK_LINE_RE.match(line):
            return "boilerplate"
        chars = line.replace(" ", "")
        if chars:
            symbols = sum(1 for c in chars if not c.isalnum())
            if symbols / len(chars) > self.max_symbol_frac:
                return "symbols"
        if self.require_terminal_punct and not line.endswith(self._stops):
            return "no_terminal_punct"
        return None

    def process(self, doc: Document) -> Document | str:
        out: list[str] = []
        removed: dict[str, int] = {}
        for line in doc.text.split("\n"):
            s = line.strip()
            kind = self.line_kind(s) if s else None
            if kind is None:
                out.append(line)
            else:
                removed[kind] = removed.get(kind, 0) + 1
                self.stats.tally("lines_removed", kind)
        if removed:
            doc.meta["lines_removed"] = removed
            doc.text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")
        if not doc.text.strip():
            return "empty_after_line_filter"
        return doc
