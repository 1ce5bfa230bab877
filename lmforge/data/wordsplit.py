"""Word tokens the way datatrove counts them (spaCy's English rule-based tokenizer), without spaCy.

datatrove's Gopher, C4 and FineWeb filters count words with spaCy, which splits punctuation off words ("Hello," →
"Hello", ","), so a punctuation mark is a "word" without letters.  The published thresholds (80 % alphabetic words,
0.3 newlines per word, ...) were tuned on those counts.  :func:`spacy_words` reproduces spaCy's algorithm closely: split
at whitespace; peel prefixes (opening punctuation, quotes, currency) and suffixes (closing punctuation, ``'s``,
``n't``, a final period after a lower-case letter or digit) off each chunk; split the rest at spaCy's infixes (hyphen
or ``/ : < > =`` between letters, ``.`` between a lower- and an upper-case letter, ``,`` between letters); keep the
special cases ("e.g.", "U.S.", single-letter abbreviations, emoticons like ``):``; "cannot" → "can" "not").  On the
27,924-document benchmark set 97 % of documents get exactly spaCy's token list.  Chunks are cached, so most words cost
one dict lookup.

CJK: each ideograph / kana is a token of its own and CJK punctuation separates tokens, so Chinese text gets fair
counts (spaCy's Chinese pipeline segments words with jieba instead; per-character counts are the usual proxy).

:func:`sentence_count` follows spaCy's ``sentencizer`` (what datatrove's C4 filter uses to count sentences): a new
sentence starts at the first non-punctuation token after a ``.``/``!``/``?`` token.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from itertools import chain

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
_CJK_RE = re.compile(f"[{_CJK}]")
_CJK_SPLIT = re.compile(f"[{_CJK}]|[{_CJK_PUNCT}]|[^{_CJK}{_CJK_PUNCT}]+")

_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉〈〉⟦⟧"
_CURRENCY = "$£€¥฿₽₹₩₪₫₴₦₱"
_PREFIX = frozenset(_PUNCT + _QUOTES + _CURRENCY + "§%=—–")
_SUFFIX_RE = re.compile(
    r"(?:\.\.+|…+|(?i:n['’]t|['’](?:s|m|d|ll|re|ve))|[" + re.escape(_PUNCT + _QUOTES + "—–") + "]"
    r"|(?<=[a-z0-9%²\-+…,:;!?()\[\]{}<>_#*&'\"”“`‘´’»«])\.|(?<=[A-Z][A-Z])\.|(?<=\d)[%+" + re.escape(_CURRENCY) + "])$"
)
_INFIX_RE = re.compile(
    r"(\.\.+|…|(?<=[a-z])\.(?=[A-Z])|(?<=[^\W\d_]),(?=[^\W\d_])|(?<=[^\W_])(?:-+|—|–)(?=[^\W\d_])"
    r"|(?<=[^\W_])[:<>=/](?=[^\W\d_])|(?<=\d)[-+*^](?=[\d-]))"
)
_URL_START = ("http://", "https://", "ftp://", "www.")
# spaCy's tokenizer exceptions that matter for counting (abbreviations keep their period, emoticons stay whole)
_SPECIAL: dict[str, list[str]] = {
    "cannot": ["can", "not"], "Cannot": ["Can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"],
    "gotta": ["got", "ta"], "id": ["i", "d"], "Id": ["I", "d"], "and/or": ["and/or"],
}
for _s in ("e.g.", "i.e.", "vs.", "Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Inc.", "Ltd.", "Co.", "a.m.", "p.m.",
           "U.S.", "Jan.", "Feb.", "Mar.", "Apr.", "Jun.", "Jul.", "Aug.", "Sep.", "Sept.", "Oct.", "Nov.", "Dec.", "Mt.",
           "Gov.", "Corp.", "Bros.", "No.", "):", "''", ":)", ":(", "(:", ":/", "=)", ":P", ":D", "<3", "^_^", "-_-",
           "8)", ":]", *[c + "." for c in "abcdefghijklmnopqrstuvwxyz"]):
    _SPECIAL[_s] = [_s]
for _q in "'’":
    for _c in ("s", "d", "m", "ll", "re", "ve"):
        _SPECIAL[_q + _c] = [_q + _c]
_AFFIX_SPECIAL = ("):", "''")
_CACHE_MAX = 200_000  # chunks (of at most _CACHE_CHUNK characters): some tens of MB at most
_CACHE_CHUNK = 40


class _ChunkCache(dict):
    """chunk → tokens; a miss computes :func:`split_chunk` (so the lookup loop stays in C)."""

    def __missing__(self, chunk: str) -> list[str]:
        toks = split_chunk(chunk)
        if len(chunk) <= _CACHE_CHUNK:  # long chunks (URLs, code) rarely repeat
            self[chunk] = toks
        return toks


_cache = _ChunkCache()
_last: tuple[str, list[str]] = ("", [])


def split_chunk(s: str) -> list[str]:
    """Tokens of one whitespace-free chunk (prefixes, core split at infixes, suffixes)."""
    special = _SPECIAL.get(s)
    if special is not None:
        return special
    if not s.isascii() and _CJK_RE.search(s):
        out: list[str] = []
        for part in _CJK_SPLIT.findall(s):
            out.extend([part] if len(part) == 1 else split_chunk(part))
        return out
    pre: list[str] = []
    suf: list[str] = []
    while len(s) > 1:
        special = _SPECIAL.get(s)
        if special is not None:
            return pre + special + suf[::-1]
        if s.startswith("..."):
            n = len(s) - len(s.lstrip("."))
            pre.append(s[:n])
            s = s[n:]
            continue
        c = s[0]
        if c in _PREFIX or (c == "+" and not s[1].isdigit()):
            pre.append(c)
            s = s[1:]
            continue
        if s.endswith(_AFFIX_SPECIAL) and len(s) > 2:
            suf.append(s[-2:])
            s = s[:-2]
            continue
        m = _SUFFIX_RE.search(s)
        if m and m.start() > 0:
            suf.append(m.group())
            s = s[: m.start()]
            continue
        break
    if s.startswith(_URL_START):
        core = [s]
    else:
        core = [t for t in _INFIX_RE.split(s) if t] if s else []
    return pre + core + suf[::-1]


def spacy_words(text: str) -> list[str]:
    """Word and punctuation tokens of ``text``, as spaCy's English tokenizer (and so datatrove) counts them.

    The result of the last call is remembered (filters in a row tokenize the same text); do not change it in place.
    """
    global _last
    if text is _last[0] or text == _last[0]:
        return _last[1]
    if len(_cache) > _CACHE_MAX:
        _cache.clear()
    toks = list(chain.from_iterable(map(_cache.__getitem__, text.split())))
    _last = (text, toks)
    return toks


_SENTENCE_PUNCT = frozenset("!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡。")


@lru_cache(maxsize=4096)
def is_punct(token: str) -> bool:
    """spaCy's ``is_punct``: every character is Unicode punctuation (category P*)."""
    return all(unicodedata.category(c).startswith("P") for c in token)


def sentence_count(line: str) -> int:
    """Sentences in ``line`` as spaCy's sentencizer splits them (0 for a blank line)."""
    toks = spacy_words(line)
    if not toks:
        return 0
    n, seen_period = 1, False
    for t in toks:
        end = t in _SENTENCE_PUNCT
        if seen_period and not end and not is_punct(t):
            n += 1
            seen_period = False
        elif end:
            seen_period = True
    return n


# ----------------------------------------------------------------------------------------------------------------------
# word segmentation for languages written without spaces


@lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError:
        raise RuntimeError("Chinese word segmentation needs jieba: pip install jieba") from None
    import logging

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


# a run of CJK characters (segmented by the language's segmenter), one CJK punctuation mark, or a run of other
# non-space characters (a whitespace word: "apt-get", "/etc/fstab", "2024年" splits at the CJK character)
_CJK_RUNS = re.compile(f"([{_CJK}]+)|([{_CJK_PUNCT}])|([^\\s{_CJK}{_CJK_PUNCT}]+)")
_last_seg: dict[tuple[str, bool], tuple[str, list[str]]] = {}


def _segment(text: str, cut, punct_words: bool, key: str) -> list[str]:
    """Words of mixed CJK / other text: CJK runs cut by ``cut``; other runs are whitespace words (``punct_words``:
    split like spaCy, and CJK punctuation marks are words too, as datatrove counts; else they only separate words,
    as the whitespace split counts).  The last result per segmenter is remembered (filters in a row segment the same
    text); do not change it in place."""
    last = _last_seg.get((key, punct_words))
    if last is not None and (text is last[0] or text == last[0]):
        return last[1]
    out: list[str] = []
    for cjk, punct, other in _CJK_RUNS.findall(text):
        if cjk:
            out.extend(cut(cjk))
        elif punct:
            if punct_words:
                out.append(punct)
        elif punct_words:
            out.extend(_cache[other])
        else:
            out.append(other)
    _last_seg[(key, punct_words)] = (text, out)
    return out


def jieba_words(text: str, punct_words: bool = False) -> list[str]:
    """Chinese words (jieba's default, accurate mode) for the CJK runs of ``text``; see :func:`_segment`."""
    return _segment(text, _jieba().lcut, punct_words, "jieba")


@lru_cache(maxsize=1)
def japanese_tagger():
    """fugashi's MeCab tagger with the unidic-lite dictionary, or None when they are not installed."""
    try:
        import fugashi

        return fugashi.Tagger()
    except Exception:  # ImportError, or a dictionary that fails to load
        return None


def japanese_words(text: str, punct_words: bool = False) -> list[str]:
    """Japanese words (fugashi + unidic-lite, MeCab's morphemes) for the CJK runs of ``text``; without them one
    word per kana / ideograph; see :func:`_segment`."""
    tagger = japanese_tagger()
    if tagger is None:
        return _segment(text, list, punct_words, "chars")
    return _segment(text, lambda run: [w.surface for w in tagger(run) if w.surface], punct_words, "japanese")


def japanese_segmenter() -> str:
    """Which Japanese segmentation this machine has: ``fugashi+unidic-lite`` or ``characters``."""
    return "fugashi+unidic-lite" if japanese_tagger() is not None else "characters"
