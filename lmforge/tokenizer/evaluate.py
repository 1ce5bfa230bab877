"""Tokenizer compression on held-out text, per language / domain / source: ``lmforge tokenizer eval``.

Compression is UTF-8 bytes per token (higher is better: fewer tokens for the same text, so a longer effective context
and cheaper training).  Fertility is tokens per word (words counted per language as the data rules count them: jieba
for Chinese, MeCab for Japanese, whitespace words elsewhere) and tokens per character: what a language mixture does to
tokenisation, per language.  Documents are grouped by fields of their ``meta`` (``lang``, ``domain``, ``source``; a
document without the field counts under ``(none)``).  With ``split="val"`` only the documents the tokenizer stage
held out are measured (the same id hash, with the tokenizer artifact's own ``val_fraction``), so the figure is not
flattered by text the BPE was trained on.

Writes ``compression.json`` (every group's docs, bytes, chars, tokens, bytes/token, chars/token) and
``compression.md`` (one table per grouping field) into ``report_dir``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Literal

from pydantic import Field, field_validator

from lmforge.artifacts import is_artifact, read_manifest, write_json, write_text
from lmforge.config import StageConfig
from lmforge.data.io import iter_documents
from lmforge.progress import console
from lmforge.tokenizer.bpe import load_tokenizer
from lmforge.tokenizer.stage import REPEAT_SUFFIX, is_val

NONE = "(none)"
DEFAULT_VAL_FRACTION = 0.05


class Config(StageConfig):
    """Measure a tokenizer's compression (bytes/token) per language / domain / source on held-out documents."""

    tokenizer: str = Field(description="Folder holding tokenizer.json (a tokenizer artifact or a model folder).")
    data: list[str] = Field(description="Data artifact folder(s) or JSONL(.gz/.zst) files with {id, text, meta}.")
    group_by: list[str] = Field(default_factory=lambda: ["lang", "domain", "source"],
                                description="meta fields to group documents by.")
    split: Literal["val", "all"] = Field("val", description="val: only held-out documents (by id hash); all: every one.")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                description="Held-out share (0: the tokenizer artifact's own, else 0.05).")
    max_docs: int = Field(0, ge=0, description="Stop after this many measured documents (0: no limit).")
    batch_docs: int = Field(256, ge=1, description="Documents encoded per batch.")
    report_dir: str = Field("", description="Folder for compression.json / compression.md (default: "
                                            "TOKENIZER/compression).")

    @field_validator("data", "group_by", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


def _held_out_fraction(tokenizer_dir: Path, given: float) -> float:
    if given:
        return given
    if is_artifact(tokenizer_dir):
        m = read_manifest(tokenizer_dir)
        if m.stage == "tokenizer" and "val_fraction" in m.config:
            return float(m.config["val_fraction"])
    return DEFAULT_VAL_FRACTION


def _documents(data: Iterable[str], split: str, fraction: float, max_docs: int) -> Iterable[dict]:
    n = 0
    for path in data:
        for doc in iter_documents(path):
            if not doc.get("text") or (split == "val" and not is_val(str(doc["id"]), fraction)):
                continue
            yield doc
            n += 1
            if max_docs and n >= max_docs:
                return


def held_out_documents(tokenizer_dir: str | os.PathLike, data: list[str] | None = None) -> Iterable[dict]:
    """The documents a tokenizer artifact held out (its ``val`` split, by the same id hash and ``val_fraction``),
    read from ``data`` or, by default, from the data the artifact was packed from (its manifest's ``data``).  Mixing
    copies (``<id>#rep<k>``) are left out: each held-out text counts once."""
    tokenizer_dir = Path(tokenizer_dir)
    if data is None:
        if not is_artifact(tokenizer_dir):
            raise ValueError(f"{tokenizer_dir}: not a tokenizer artifact (no manifest.json): its data is unknown")
        data = [str(d) for d in read_manifest(tokenizer_dir).config.get("data") or []]
    docs = _documents(data, "val", _held_out_fraction(tokenizer_dir, 0.0), 0)
    return (d for d in docs if not REPEAT_SUFFIX.search(str(d["id"])))


def _batched(items: Iterable[dict], size: int) -> Iterable[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _row(c: dict[str, int]) -> dict[str, float | int]:
    return {**c, "bytes_per_token": round(c["bytes"] / max(1, c["tokens"]), 4),
            "chars_per_token": round(c["chars"] / max(1, c["tokens"]), 4),
            "tokens_per_word": round(c["tokens"] / max(1, c["words"]), 4),
            "tokens_per_char": round(c["tokens"] / max(1, c["chars"]), 4)}


def evaluate_tokenizer(tokenizer_dir: str | os.PathLike, data: str | os.PathLike | list, group_by: Iterable[str] = (
        "lang", "domain", "source"), split: Literal["val", "all"] = "val", val_fraction: float = 0.0,
        max_docs: int = 0, batch_docs: int = 256) -> dict:
    """``{"tokenizer", "split", "val_fraction", "overall": row, "groups": {field: {value: row}}}``.

    A row is ``{docs, bytes, chars, words, tokens, bytes_per_token, chars_per_token, tokens_per_word,
    tokens_per_char}`` (words per the document's ``meta.lang``); special tokens are not added."""
    tokenizer_dir = Path(tokenizer_dir)
    tok, _ = load_tokenizer(tokenizer_dir)
    paths = [str(d) for d in data] if isinstance(data, (list, tuple)) else [str(data)]
    fraction = _held_out_fraction(tokenizer_dir, val_fraction)
    fields = list(group_by)
    from lmforge.data.langprofiles import LangProfiles, word_count

    profiles = LangProfiles.load()
    zero = lambda: {"docs": 0, "bytes": 0, "chars": 0, "words": 0, "tokens": 0}  # noqa: E731
    overall = zero()
    groups: dict[str, dict[str, dict[str, int]]] = {f: defaultdict(zero) for f in fields}
    for batch in _batched(_documents(paths, split, fraction, max_docs), batch_docs):
        encoded = tok.encode_batch([d["text"] for d in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encoded):
            text = doc["text"]
            meta = doc.get("meta") or {}
            counts = {"docs": 1, "bytes": len(text.encode("utf-8")), "chars": len(text),
                      "words": word_count(text, meta.get("lang"), profiles), "tokens": len(enc.ids)}
            for target in [overall] + [groups[f][str(meta.get(f) or NONE)] for f in fields]:
                for k, v in counts.items():
                    target[k] += v
    if not overall["docs"]:
        where = ", ".join(paths)
        raise ValueError(f"{where}: no documents to measure" + (
            f" in the held-out split (val_fraction={fraction}); use split='all'" if split == "val" else ""))
    return {
        "tokenizer": str(tokenizer_dir),
        "vocab_size": tok.get_vocab_size(),
        "data": paths,
        "split": split,
        "val_fraction": fraction if split == "val" else None,
        "overall": _row(overall),
        "groups": {f: {v: _row(c) for v, c in sorted(g.items(), key=lambda kv: -kv[1]["bytes"])}
                   for f, g in groups.items()},
    }


def to_markdown(result: dict) -> str:
    """One table per grouping field (largest groups first) and the overall figure."""
    o = result["overall"]
    lines = [f"# Tokenizer compression: {result['tokenizer']}", "",
             f"vocab {result['vocab_size']:,}; {result['split']} documents"
             + (f" (held-out fraction {result['val_fraction']})" if result["val_fraction"] is not None else "")
             + f"; overall **{o['bytes_per_token']} bytes/token**, {o['chars_per_token']} chars/token over "
               f"{o['docs']:,} docs, {o['tokens']:,} tokens.", ""]
    for field, rows in result["groups"].items():
        lines += [f"## by {field}", "", f"| {field} | docs | KB | tokens | bytes/token | chars/token | tokens/word "
                                        f"| tokens/char |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for value, r in rows.items():
            lines.append(f"| {value} | {r['docs']:,} | {r['bytes'] / 1024:,.1f} | {r['tokens']:,} | "
                         f"{r['bytes_per_token']:.3f} | {r['chars_per_token']:.3f} | {r['tokens_per_word']:.3f} | "
                         f"{r['tokens_per_char']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def run(config: Config) -> dict:
    """Evaluate, write ``compression.json`` + ``compression.md`` and print the overall figure."""
    result = evaluate_tokenizer(config.tokenizer, config.data, config.group_by, config.split, config.val_fraction,
                                config.max_docs, config.batch_docs)
    out = Path(config.report_dir) if config.report_dir else Path(config.tokenizer) / "compression"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compression.json", result)
    write_text(out / "compression.md", to_markdown(result))
    o = result["overall"]
    console.print(f"  {o['bytes_per_token']} bytes/token over {o['docs']:,} {config.split} documents; "
                  f"tables in {out / 'compression.md'}")
    return result
