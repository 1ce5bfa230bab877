"""Per-language rule profiles: the thresholds and word lists of the Gopher / C4 / FineWeb rules for each language.

The table is data, ``lang_profiles.yaml`` beside this module (it says where every value comes from: FineWeb-2's
per-language configs, or ours with a reason).  A filter looks up the profile of each document's ``meta.lang`` (set
by ``langid_v1``) and uses its values over the filter's own (which stay the English ones)::

    profiles = LangProfiles.load()            # or LangProfiles.load("my_profiles.yaml") to add / override languages
    p = profiles.get("zh")                    # LangProfile(lang="zh", segmenter="jieba", values={...})
    p.resolve({"min_stop_words": 2, ...})     # the filter's parameters with the Chinese values put in

A language without a profile gets the ``fallback`` entry: the rules that do not transfer between languages (stop
words, mean word length) are skipped, the script-neutral ones keep the filter's values; text in a script without
spaces (CJK) is counted one word per character.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

BUILTIN = Path(__file__).with_name("lang_profiles.yaml")
SEGMENTERS = ("default", "jieba", "japanese", "chars")
# the rule parameters a profile may set (filters take the ones they know)
KEYS = frozenset({
    "stop_words", "min_stop_words", "mean_word_length", "min_alpha_words_frac", "min_words", "max_words",
    "max_dup_line_frac", "max_dup_para_frac", "top_ngram_fracs", "dup_ngram_fracs", "line_punct_thr",
    "new_line_ratio", "short_line_length", "line_end", "min_words_per_line",
})
FALLBACK = "fallback"


@dataclass(frozen=True)
class LangProfile:
    lang: str
    segmenter: str = "default"
    values: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    fallback: bool = False

    def resolve(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (a filter's own parameters) with this profile's values for the keys ``base`` has."""
        out = dict(base)
        for k, v in self.values.items():
            if k == "mean_word_length":
                lo, hi = (None, None) if v is None else v
                if "min_mean_word_length" in out:
                    out["min_mean_word_length"], out["max_mean_word_length"] = lo, hi
            elif k in out:
                out[k] = tuple(v) if isinstance(v, list) else v
        return out


def _check(entry: Any, lang: str, where: str) -> LangProfile:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: language {lang!r}: expected a mapping of rule values, got {type(entry).__name__}")
    entry = dict(entry)
    segmenter = entry.pop("segmenter", "default")
    source = str(entry.pop("source", ""))
    if segmenter not in SEGMENTERS:
        raise ValueError(f"{where}: language {lang!r}: unknown segmenter {segmenter!r} (one of {', '.join(SEGMENTERS)})")
    unknown = set(entry) - KEYS
    if unknown:
        raise ValueError(f"{where}: language {lang!r}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted(KEYS))}")
    mwl = entry.get("mean_word_length")
    if mwl is not None and (not isinstance(mwl, list) or len(mwl) != 2):
        raise ValueError(f"{where}: language {lang!r}: mean_word_length must be [min, max] or null")
    if "stop_words" in entry:
        entry["stop_words"] = frozenset(str(w).lower() for w in entry["stop_words"] or ())
    return LangProfile(lang, segmenter, entry, source, fallback=lang == FALLBACK)


class LangProfiles:
    """The profile table: built-in languages, optionally extended / overridden by a user YAML file."""

    def __init__(self, profiles: dict[str, LangProfile]) -> None:
        self.profiles = profiles
        self._fallback = profiles.get(FALLBACK) or LangProfile(FALLBACK, fallback=True)

    @classmethod
    def load(cls, extra: str | os.PathLike | None = None) -> "LangProfiles":
        return _load(str(extra) if extra else None)

    @property
    def langs(self) -> list[str]:
        return sorted(k for k in self.profiles if k != FALLBACK)

    def get(self, lang: str | None, text: str = "") -> LangProfile:
        """The profile of ``lang``; the fallback (named after ``lang``) when there is none.  The fallback counts
        text that is mostly CJK one word per character (whitespace words would be whole sentences)."""
        p = self.profiles.get(lang or "")
        if p is not None and not p.fallback:
            return p
        fb = self._fallback
        seg = "chars" if text and mostly_cjk(text) else fb.segmenter
        return LangProfile(lang or "und", seg, fb.values, fb.source, fallback=True)


def _read(path: Path) -> dict[str, LangProfile]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the language profiles: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of language code → rule values")
    return {str(lang): _check(entry, str(lang), str(path)) for lang, entry in raw.items()}


@lru_cache(maxsize=8)
def _load(extra: str | None) -> LangProfiles:
    profiles = _read(BUILTIN)
    if extra:
        profiles.update(_read(Path(extra)))
    return LangProfiles(profiles)


_CJK_RE = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


def mostly_cjk(text: str, sample: int = 2000) -> bool:
    """More than half of the letters (of the first ``sample`` characters) are CJK ideographs or kana."""
    letters = "".join(filter(str.isalpha, text[:sample]))
    return bool(letters) and not letters.isascii() and len(_CJK_RE.findall(letters)) * 2 > len(letters)


class Profiled:
    """Mixin for the rule filters: :meth:`params` gives the parameters for one document, its language's profile
    applied (and counts which profile was used in the step's ``profile`` tally)."""

    profiles: LangProfiles | None = None
    word_split: str = "whitespace"

    def use_profiles(self, profiles: LangProfiles | None, base: dict[str, Any]) -> None:
        self.profiles = profiles
        self._base = base
        self._resolved: dict[Any, tuple[dict[str, Any], str]] = {}

    def params(self, doc: Any) -> tuple[dict[str, Any], str]:
        """``(parameters, word split)`` for ``doc``: the filter's own without profiles or without ``meta.lang``."""
        lang = doc.meta.get("lang") if self.profiles is not None else None
        if lang is None:
            return self._base, self.word_split
        p = self.profiles.get(lang, doc.text)
        self.stats.tally("profile", f"fallback ({lang})" if p.fallback else lang)  # type: ignore[attr-defined]
        key = (lang, p.segmenter)
        got = self._resolved.get(key)
        if got is None:
            if p.segmenter == "default":
                split = self.word_split
            elif p.segmenter == "chars":
                split = "spacy" if self.word_split == "spacy" else "chars"
            else:  # jieba / japanese, counting the other runs and punctuation as the config's word_split does
                split = p.segmenter + ("+spacy" if self.word_split == "spacy" else "")
            resolved = p.resolve(self._base)
            got = self._resolved[key] = (self._base if resolved == self._base else resolved, split)
        return got


def word_count(text: str, lang: str | None, profiles: LangProfiles | None = None) -> int:
    """Words in ``text`` as the rules count them for ``lang`` (its profile's segmenter: jieba for Chinese, MeCab for
    Japanese, whitespace words elsewhere; CJK characters one each without a segmenter)."""
    from lmforge.data.filters import words

    p = (profiles or LangProfiles.load()).get(lang, text)
    split = p.segmenter if p.segmenter in ("jieba", "japanese") else "whitespace"
    return len(words(text, split))
