"""Build the multilingual check corpus under data/multilingual/ from Debian packages installed on this machine.

    apt-get install -y --no-install-recommends debian-reference-{en,de,es,fr,it,ja,pt,zh-cn,zh-tw} debian-faq-ko \
        man-db manpages-ru manpages-pl fortunes-{zh,de,ru,pl,es,it}     # the Makefile's MULTILINGUAL_DEBS
    python bench/build_multilingual_corpus.py [--docs 24] [--out data/multilingual]

Every document is real text: consecutive paragraphs of one source, cut into pieces of about ``--bytes`` UTF-8 bytes
at paragraph boundaries, taken from the middle of the source (past its table of contents), so the languages of
the Debian Reference (one book, translated) are near-parallel.  The gold language is ``meta.gold_lang``.
``mixed.jsonl`` joins a piece of the English book with a piece of another language (real text, mixed by us;
``meta.gold_shares``).  Sources and licences: data/multilingual/README.md.

Every source file is checked before anything is written (a missing one is named with its Debian package), and the
corpus is written to a temporary folder that replaces ``--out``'s JSONL files only once all of them are complete: a
failed build never leaves a partial corpus behind for the tests to run on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REF = "/usr/share/debian-reference/debian-reference.{}.txt.gz"
SOURCES = {  # gold language → (name, licence, reader arguments)
    "en": ("debian-reference-en", "GPL-2+", ("ref", "en")),
    "de": ("debian-reference-de", "GPL-2+", ("ref", "de")),
    "es": ("debian-reference-es", "GPL-2+", ("ref", "es")),
    "fr": ("debian-reference-fr", "GPL-2+", ("ref", "fr")),
    "it": ("debian-reference-it", "GPL-2+", ("ref", "it")),
    "pt": ("debian-reference-pt", "GPL-2+", ("ref", "pt")),
    "ja": ("debian-reference-ja", "GPL-2+", ("ref", "ja")),
    "zh": ("debian-reference-zh-cn", "GPL-2+", ("ref", "zh-cn")),
    "zh-tw": ("debian-reference-zh-tw", "GPL-2+", ("ref", "zh-tw")),
    "ko": ("debian-faq-ko", "Debian FAQ permission notice (LICENSES/debian-faq-copyright)", ("faq", "ko")),
    "ru": ("manpages-ru", "GPL-3+", ("man", "ru")),
    "pl": ("manpages-pl", "GPL-3+", ("man", "pl")),
    "zh-classical": ("fortunes-zh (tang300)", "GPL-3+", ("fortune", "/usr/share/games/fortunes/tang300.u8")),
}

# mixed.jsonl: English + quotes from one of these fortune files (other language -> path, licence, Debian package)
FORTUNES = {
    "zh": ("/usr/share/games/fortunes/tang300.u8", "GPL-3+", "fortunes-zh"),
    "de": ("/usr/share/games/fortunes/de/zitate", "GPL-2+", "fortunes-de"),
    "ru": ("/usr/share/games/fortunes/ru/2001.03", "GPL-2+", "fortunes-ru"),
    "pl": ("/usr/share/games/fortunes/pl/advocacy", "GPL-2+", "fortunes-pl"),
    "es": ("/usr/share/games/fortunes/es/ciencia.fortunes", "GPL-2+", "fortunes-es"),
    "it": ("/usr/share/games/fortunes/it/italia", "public domain (fortunes-it)", "fortunes-it"),
}


def missing_sources() -> list[str]:
    """``path (Debian package)`` for every source this build reads that is not on this machine."""
    need: list[tuple[str, str]] = []
    for name, _licence, (kind, arg) in SOURCES.values():
        path = {"ref": REF.format(arg), "faq": f"/usr/share/doc/debian/FAQ/debian-faq.{arg}.txt.gz",
                "man": f"/usr/share/man/{arg}/man1"}.get(kind, arg)
        need.append((path, name.split(" ")[0]))
    need += [(path, package) for path, _licence, package in FORTUNES.values()]
    missing = [f"{path} ({package})" for path, package in need if not Path(path).exists()]
    return missing + ([] if shutil.which("man") else ["the man command (man-db)"])


def paragraphs_ref(code: str) -> list[str]:
    text = gzip.open(REF.format(code), "rt", encoding="utf-8").read()
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text)]


def paragraphs_faq(code: str) -> list[str]:
    text = gzip.open(f"/usr/share/doc/debian/FAQ/debian-faq.{code}.txt.gz", "rt", encoding="utf-8").read()
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text)]


def paragraphs_man(code: str) -> list[str]:
    out: list[str] = []
    for page in sorted(Path(f"/usr/share/man/{code}/man1").glob("*.1.gz"))[:80]:
        r = subprocess.run(["man", "-l", "-E", "UTF-8", str(page)], capture_output=True, text=True,
                           env={"MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "PATH": "/usr/bin:/bin"})
        text = re.sub(r".\x08", "", r.stdout)
        out.extend(p.strip("\n") for p in re.split(r"\n\s*\n", text))
    return out


def paragraphs_fortune(path: str) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(path, encoding="utf-8").read())  # colour codes of the .u8 files
    return [p.strip("\n") for p in text.split("\n%\n")]


def pieces(paras: list[str], n_docs: int, max_bytes: int, skip_frac: float) -> list[str]:
    """``n_docs`` pieces of consecutive paragraphs (about ``max_bytes`` each) from ``skip_frac`` of the way in."""
    paras = [p for p in paras if p.strip()]
    docs, buf, size = [], [], 0
    for p in paras[int(len(paras) * skip_frac):]:
        buf.append(p)
        size += len(p.encode("utf-8"))
        if size >= max_bytes:
            docs.append("\n\n".join(buf))
            buf, size = [], 0
            if len(docs) == n_docs:
                break
    return docs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--bytes", type=int, default=1800)
    ap.add_argument("--out", default="data/multilingual")
    args = ap.parse_args()
    missing = missing_sources()
    if missing:
        sys.exit("multilingual corpus not built: missing " + ", ".join(missing))
    final = Path(args.out)
    final.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=".building-", dir=final))
    try:
        build(args, out)
        for f in sorted(out.glob("*.jsonl")):  # all complete: replace the old files
            f.replace(final / f.name)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def build(args: argparse.Namespace, out: Path) -> None:
    readers = {"ref": paragraphs_ref, "faq": paragraphs_faq, "man": paragraphs_man, "fortune": paragraphs_fortune}
    by_lang: dict[str, list[str]] = {}
    for key, (name, licence, (kind, arg)) in SOURCES.items():
        gold = key.split("-")[0]
        docs = pieces(readers[kind](arg), args.docs, args.bytes, 0.0 if kind == "fortune" else 0.3)
        by_lang[key] = docs
        with open(out / f"{key}.jsonl", "w", encoding="utf-8") as f:
            for i, text in enumerate(docs):
                meta = {"gold_lang": gold, "corpus_source": name, "license": licence}
                f.write(json.dumps({"id": f"{key}-{i:03d}", "text": text, "meta": meta}, ensure_ascii=False) + "\n")
        print(f"{key}: {len(docs)} documents, {sum(len(d.encode()) for d in docs):,} bytes from {name}")
    # mixed: the first half of an English piece + fortune-file quotes in another language (real text both, mixed by
    # us; the translations above are not used here: they hold untranslated English paragraphs themselves)
    with open(out / "mixed.jsonl", "w", encoding="utf-8") as f:
        k = 0
        for other, (path, licence, _package) in FORTUNES.items():
            quotes = [q for q in paragraphs_fortune(path) if 40 <= len(q) <= 600]
            for i in range(4):
                en = by_lang["en"][-(i + 1)].split("\n\n")
                a = "\n\n".join(en[: max(1, len(en) // 2)])
                b = "\n\n".join(quotes[i * 3: i * 3 + 3])
                text = f"{a}\n\n{b}"
                shares = {"en": round(len(a) / len(text), 3), other: round(len(b) / len(text), 3)}
                meta = {"gold_lang": "mixed", "gold_shares": shares, "license": f"GPL-2+ / {licence}",
                        "corpus_source": f"debian-reference-en + {path.removeprefix('/usr/share/games/')}"}
                f.write(json.dumps({"id": f"mixed-{k:03d}", "text": text, "meta": meta}, ensure_ascii=False) + "\n")
                k += 1
    print(f"mixed: {k} documents")


if __name__ == "__main__":
    main()
