"""Chinese / Japanese text normalisation: the ``cjk_normalize_v1`` step.

* Width: full-width Latin letters, digits, the ideographic space and the full-width forms of ``@ # $ % & + - / = _``
  become their ASCII forms (``ＡＢＣ１２３`` → ``ABC123``, so e-mail / phone / number rules and tokenizers see one
  form); half-width katakana become full-width (``ｶﾀｶﾅ`` → ``カタカナ``, NFKC).  Chinese full-width punctuation
  (，。！？：；（）「」) is kept: it is the standard form in Chinese text.
* Script: optional traditional → simplified Chinese (or back) with OpenCC (the ``opencc`` wheel, Apache-2.0), for
  documents whose ``meta.lang`` is ``zh`` or that have Chinese paragraphs (``meta.lang_shares``);
  ``meta.zh_converted`` records the conversion.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from lmforge.data.documents import Document
from lmforge.data.steps import Step

ZH_CONVERSIONS = ("none", "t2s", "s2t", "tw2s", "hk2s")
_FULL_ASCII = "".join(chr(c) for c in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))) + \
    "＠＃＄％＆＋－／＝＿\u3000"
_WIDTH = str.maketrans({c: unicodedata.normalize("NFKC", c) for c in _FULL_ASCII})
_HALF_KANA = re.compile("[\uff61-\uff9f]+")
_NEEDS_WIDTH = re.compile(f"[{re.escape(_FULL_ASCII)}\uff61-\uff9f]")


def normalize_width(text: str) -> str:
    """Full-width ASCII letters / digits / a few symbols → ASCII, half-width katakana → full-width."""
    if text.isascii() or not _NEEDS_WIDTH.search(text):
        return text
    text = text.translate(_WIDTH)
    return _HALF_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)


@lru_cache(maxsize=4)
def opencc_converter(conversion: str):
    try:
        import opencc
    except ImportError:
        raise RuntimeError("traditional/simplified Chinese conversion needs OpenCC: pip install opencc "
                           "(or lmforge[cjk])") from None
    return opencc.OpenCC(conversion)


class CjkNormalize(Step):
    """Width normalisation (``width``) and optional OpenCC conversion of Chinese documents (``zh_convert``); never
    drops.  Counts changed documents in the ``changed`` tally (``width``, ``t2s`` ...)."""

    name = "cjk_normalize_v1"

    def __init__(self, width: bool = True, zh_convert: str = "none") -> None:
        super().__init__()
        if zh_convert not in ZH_CONVERSIONS:
            raise ValueError(f"unknown Chinese conversion {zh_convert!r} (one of {', '.join(ZH_CONVERSIONS)})")
        self.width = width
        self.zh_convert = zh_convert
        self._cc = opencc_converter(zh_convert).convert if zh_convert != "none" else None

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        if self.width:
            new = normalize_width(text)
            if new is not text and new != text:
                self.stats.tally("changed", "width")
                text = new
        if self._cc is not None and (doc.meta.get("lang") == "zh" or "zh" in (doc.meta.get("lang_shares") or {})):
            new = self._cc(text)
            if new != text:
                self.stats.tally("changed", self.zh_convert)
                doc.meta["zh_converted"] = self.zh_convert
                text = new
        doc.text = text
        return doc
