"""Language ratios of a data run: ``lmforge data langs RUN``.

Reads a finished data run's kept (``docs/``) and dropped (``dropped/``) documents and its step list, and counts per
language (``meta.lang``; ``und`` for documents dropped before language ID) the documents, characters, words and
(with a tokenizer) tokens that entered the pipeline and that were left after each step.  A document dropped by step
k was in the pipeline before steps 0..k; a piece split off a mixed document (``meta.split_from``) enters after
``langid_v1`` (counted from that step on).  Characters / words / tokens are of the text as stored (the kept text, or the text when dropped), so
for steps that cut lines (C4, line junk) "before" is a lower bound.

Writes ``langs.json`` and ``langs.png`` (kept share per language after each step, and the share of each language in
the characters read vs kept) beside the run's report.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmforge.artifacts import write_json
from lmforge.data.io import iter_documents

KEYS = ("docs", "chars", "words", "tokens")


def _docs(run: Path):
    for sub in ("docs", "dropped"):
        folder = run / sub
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.name.endswith((".jsonl.zst", ".parquet")):
                    yield from iter_documents(f)


def language_table(run_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"steps": [...], "langs": {lang: {"read": counts, "after": {step: counts}}}, "totals": ...}``; counts are
    ``{docs, chars, words, tokens}`` (tokens 0 without a tokenizer)."""
    from lmforge.data.langprofiles import LangProfiles, word_count

    run = Path(run_dir)
    stats_path = run / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{run}: no stats.json here (not a finished data run)")
    steps = [s["name"] for s in json.loads(stats_path.read_text())["steps"]]
    index = {name: i for i, name in enumerate(steps)}
    langid_at = index.get("langid_v1", -1)
    tok = None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        path = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"{tokenizer}: no tokenizer.json")
        tok = Tokenizer.from_file(str(path))
    profiles = LangProfiles.load()
    zero = lambda: dict.fromkeys(KEYS, 0)  # noqa: E731
    read: dict[str, dict[str, int]] = defaultdict(zero)
    after: dict[str, list[dict[str, int]]] = defaultdict(lambda: [zero() for _ in steps])
    for doc in _docs(run):
        meta = doc.get("meta") or {}
        lang = str(meta.get("lang") or "und")
        text = doc.get("text") or ""
        c = {"docs": 1, "chars": len(text), "words": word_count(text, lang, profiles),
             "tokens": len(tok.encode(text, add_special_tokens=False).ids) if tok is not None else 0}
        dropped_at = index.get(meta.get("drop_step", ""), len(steps))  # kept: survived every step
        first = langid_at if meta.get("split_from") else 0  # a split-off piece exists from langid_v1 on
        if first == 0:
            for k in KEYS:
                read[lang][k] += c[k]
        for i in range(first, dropped_at):
            row = after[lang][i]
            for k in KEYS:
                row[k] += c[k]
    langs = sorted(set(read) | set(after), key=lambda lang: -read[lang]["docs"])
    out = {lang: {"read": dict(read[lang]), "after": {s: after[lang][i] for i, s in enumerate(steps)},
                  "kept": after[lang][-1] if steps else dict(read[lang])} for lang in langs}
    total_read = {k: sum(read[lang][k] for lang in langs) for k in KEYS}
    total_kept = {k: sum(out[lang]["kept"][k] for lang in langs) for k in KEYS}
    return {"run": str(run), "steps": steps, "tokenizer": str(tokenizer) if tokenizer else None, "langs": out,
            "totals": {"read": total_read, "kept": total_kept}}


def plot(table: dict[str, Any], path: str | os.PathLike, top: int = 12) -> None:
    """``langs.png``: kept share of each language's documents after each step; characters per language read vs
    kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = table["steps"]
    langs = list(table["langs"])[:top]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for lang in langs:
        row = table["langs"][lang]
        n = row["read"]["docs"]
        if not n:
            continue
        ax1.plot(range(len(steps) + 1), [1.0] + [row["after"][s]["docs"] / n for s in steps], marker="o",
                 label=f"{lang} ({n})")
    ax1.set_xticks(range(len(steps) + 1), ["read"] + [s.rsplit("_v", 1)[0] for s in steps], rotation=45, ha="right")
    ax1.set_ylabel("documents left / documents read")
    ax1.set_title("documents kept per language, step by step")
    ax1.legend(fontsize=8)
    read = [table["langs"][lang]["read"]["chars"] for lang in langs]
    kept = [table["langs"][lang]["kept"]["chars"] for lang in langs]
    tr, tk = max(1, sum(read)), max(1, sum(kept))
    x = range(len(langs))
    ax2.bar([i - 0.2 for i in x], [r / tr for r in read], width=0.4, label="read")
    ax2.bar([i + 0.2 for i in x], [k / tk for k in kept], width=0.4, label="kept")
    ax2.set_xticks(list(x), langs)
    ax2.set_ylabel("share of characters")
    ax2.set_title("language shares of the text, read vs kept")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(table: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    write_json(out / "langs.json", table)
    plot(table, out / "langs.png")
    return out / "langs.json", out / "langs.png"
