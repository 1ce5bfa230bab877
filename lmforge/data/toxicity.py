"""Toxicity: a multilingual bad-word list filter and a classifier score.

* Word lists: the per-language dictionaries that ship in the PyPI package ``glin-profanity`` (MIT; 27 languages,
  derived from the LDNOOBW lists C4 used).  A document is checked against the list of its ``meta.lang`` (set by
  ``langid_v1``) plus English.  Space-separated languages match whole words and phrases; CJK lists match substrings.
  ``meta.scores.badword_ratio`` = matches / words.
  Chinese and Japanese lists leave out one-character entries, which match inside ordinary words (豆乳 "soy milk").
* Chinese spam: ``zh_spam.txt`` (phrases for gambling, fake invoices, click-farming, loan and adult ads; written for
  lmforge, Apache-2.0) in documents whose ``meta.lang`` is ``zh``: ``meta.scores.spam`` = matches; drops
  ``spam_words`` when matches / words is above ``max_badword_ratio``.
* Classifier: ``alt-profanity-check``'s bundled linear model (English), ``meta.scores.toxicity`` in [0, 1].

Drops ``toxic_words`` (ratio above ``max_badword_ratio``) and ``toxic_score`` (score above ``max_toxicity``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from lmforge.data.documents import Document
from lmforge.data.filters import WORD_RE
from lmforge.data.steps import BatchStep

# fastText language code → glin-profanity dictionary name
WORDLIST_LANGS = {
    "ar": "arabic", "zh": "chinese", "cs": "czech", "da": "danish", "nl": "dutch", "en": "english", "eo": "esperanto",
    "fi": "finnish", "fr": "french", "de": "german", "hi": "hindi", "hu": "hungarian", "it": "italian",
    "ja": "japanese", "ko": "korean", "no": "norwegian", "fa": "persian", "pl": "polish", "pt": "portuguese",
    "ru": "russian", "es": "spanish", "sv": "swedish", "th": "thai", "tr": "turkish",
}
_NO_SPACES = {"zh", "ja", "th", "ko"}


def wordlist_dir() -> Path:
    spec = importlib.util.find_spec("glin_profanity")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bad-word lists come from the package glin-profanity: pip install glin-profanity")
    return Path(spec.submodule_search_locations[0]) / "data" / "dictionaries"


@lru_cache(maxsize=None)
def load_wordlist(lang: str) -> tuple[frozenset[str], re.Pattern[str] | None]:
    """(single words, a regex for phrases / substrings) of one language's list."""
    name = WORDLIST_LANGS.get(lang)
    if name is None:
        return frozenset(), None
    path = wordlist_dir() / f"{name}.json"
    try:
        entries = [w.strip().lower() for w in json.loads(path.read_text(encoding="utf-8"))["words"] if w.strip()]
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"{path}: cannot read the word list ({err})") from None
    if lang in _NO_SPACES:
        if lang in ("zh", "ja"):  # one-character entries (乳, 屌 ...) match inside ordinary words (豆乳): left out
            entries = [w for w in entries if len(w) > 1 and any(c.isalpha() for c in w)]
        pattern = "|".join(re.escape(w) for w in sorted(entries, key=len, reverse=True))
        return frozenset(), re.compile(pattern) if pattern else None
    single = frozenset(w for w in entries if " " not in w)
    phrases = [w for w in entries if " " in w]
    pattern = "|".join(re.escape(w) for w in sorted(phrases, key=len, reverse=True))
    return single, (re.compile(rf"(?<!\w)(?:{pattern})(?!\w)") if pattern else None)


SPAM_FILE = Path(__file__).with_name("zh_spam.txt")


@lru_cache(maxsize=1)
def zh_spam_pattern() -> re.Pattern[str]:
    """The Chinese spam phrases of ``zh_spam.txt`` as one regex."""
    phrases = [ln.strip().lower() for ln in SPAM_FILE.read_text(encoding="utf-8").splitlines()
               if ln.strip() and not ln.startswith("#")]
    return re.compile("|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)))


def badword_count(text: str, langs: tuple[str, ...]) -> int:
    """Matches of the bad-word lists of ``langs`` in ``text``."""
    low = text.lower()
    toks = None
    n = 0
    for lang in dict.fromkeys(langs):
        single, rx = load_wordlist(lang)
        if single:
            toks = toks if toks is not None else WORD_RE.findall(low)
            n += sum(1 for t in toks if t.strip(".,;:!?\"'()[]") in single)
        if rx is not None:
            n += len(rx.findall(low))
    return n


class Toxicity(BatchStep):
    """Scores (and optionally drops) offensive documents; see the module docstring."""

    name = "toxicity_v1"

    def __init__(self, max_badword_ratio: float = 0.02, max_toxicity: float = 0.95, classifier: bool = True,
                 extra_langs: tuple[str, ...] = ("en",)) -> None:
        super().__init__()
        self.max_badword_ratio = max_badword_ratio
        self.max_toxicity = max_toxicity
        self.extra_langs = tuple(extra_langs)
        for lang in self.extra_langs:
            load_wordlist(lang)  # fail now if the package is missing
        self._predict = None
        if classifier:
            try:
                from profanity_check import predict_prob
            except ImportError:
                raise RuntimeError("the toxicity classifier needs alt-profanity-check: "
                                   "pip install alt-profanity-check (or turn the classifier off)") from None
            self._predict = predict_prob

    def process_batch(self, docs: list[Document]) -> list[Document | str]:
        probs = self._predict([d.text for d in docs]) if self._predict is not None else None
        out: list[Document | str] = []
        for i, doc in enumerate(docs):
            text = doc.text
            lang = doc.meta.get("lang")
            langs = ((lang,) if lang else ()) + self.extra_langs
            hits = badword_count(text, langs)
            n_words = len(WORD_RE.findall(text)) or 1
            ratio = hits / n_words
            scores = doc.meta.setdefault("scores", {})
            scores["badwords"] = hits
            scores["badword_ratio"] = round(ratio, 4)
            spam = len(zh_spam_pattern().findall(text.lower())) if lang == "zh" else 0
            if lang == "zh":
                scores["spam"] = spam
            if probs is not None:
                scores["toxicity"] = round(float(probs[i]), 4)
            if ratio > self.max_badword_ratio:
                out.append("toxic_words")
            elif spam / n_words > self.max_badword_ratio:
                out.append("spam_words")
            elif probs is not None and scores["toxicity"] > self.max_toxicity:
                out.append("toxic_score")
            else:
                out.append(doc)
        return out
