"""The tokenizer stage: train a byte-level BPE on a data artifact's kept documents and pack train/val token shards.

Documents are split into train and validation by a hash of their id (stable when the corpus grows); the validation
text is what evaluation measures loss and bits-per-byte on.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from pydantic import Field

from lmforge.artifacts import Manifest
from lmforge.config import StageConfig
from lmforge.data.io import iter_documents
from lmforge.progress import console, progress, rate_text
from lmforge.stages import begin, finished
from lmforge.tokenizer.bpe import EOS, train_bpe
from lmforge.tokenizer.shards import ShardWriter, write_index

STAGE = "tokenizer"
VERSION = "1"


class Config(StageConfig):
    """Train a byte-level BPE tokenizer on a data artifact and pack train/val token shards."""

    data: str = Field(description="Data artifact folder (output of `lmforge data run`) or JSONL(.zst) file.")
    vocab_size: int = Field(4096, ge=259, le=1_000_000, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of documents held out for validation.")
    max_length: int = Field(2048, ge=16, description="model_max_length written to tokenizer_config.json.")
    batch_docs: int = Field(256, ge=1, description="Documents encoded per batch when packing.")
    shard_tokens: int = Field(50_000_000, ge=1000, description="Maximum tokens per .bin shard.")


def is_val(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"data": config.data}, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        t0 = time.time()
        docs = [(d["id"], d["text"]) for d in iter_documents(config.data) if d["text"]]
        if not docs:
            raise ValueError(f"{config.data}: no documents to train a tokenizer on")
        split = [(i, t, is_val(i, config.val_fraction)) for i, t in docs]
        if config.val_fraction > 0 and not any(v for *_, v in split):  # tiny corpora: hold out at least one doc
            i, t, _ = split[-1]
            split[-1] = (i, t, True)
        train_texts = [t for _, t, v in split if not v]
        console.print(f"  training BPE (vocab {config.vocab_size}) on {len(train_texts):,} documents, "
                      f"{sum(map(len, train_texts)) / 1e6:.1f}M chars")
        tok = train_bpe(train_texts, config.vocab_size, out, min_frequency=config.min_frequency,
                        max_length=config.max_length, length=len(train_texts))
        t_train = time.time() - t0
        eos = tok.token_to_id(EOS)
        vocab = tok.get_vocab_size()
        writers = {s: ShardWriter(out / "tokens", s, vocab, config.shard_tokens) for s in ("train", "val")}
        t1 = time.time()
        with progress() as bar:
            task = bar.add_task("packing tokens", total=len(split), rate="")
            for start in range(0, len(split), config.batch_docs):
                batch = split[start:start + config.batch_docs]
                encoded = tok.encode_batch([t for _, t, _ in batch])
                for (_, text, val), enc in zip(batch, encoded):
                    writers["val" if val else "train"].add(enc.ids + [eos], len(text.encode("utf-8")))
                done = start + len(batch)
                bar.update(task, completed=done, rate=rate_text(done, time.time() - t1, "docs"))
        splits = {s: w.close() for s, w in writers.items()}
        write_index(out / "tokens", vocab, eos, splits)
        total_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
        total_tokens = splits["train"]["tokens"] + splits["val"]["tokens"] - splits["train"]["docs"] - splits["val"]["docs"]
        run_.metrics.update(
            vocab_size=vocab,
            train_tokens=splits["train"]["tokens"],
            val_tokens=splits["val"]["tokens"],
            train_docs=splits["train"]["docs"],
            val_docs=splits["val"]["docs"],
            bytes_per_token=round(total_bytes / max(1, total_tokens), 3),
            train_seconds=round(t_train, 2),
            pack_tokens_per_s=round((splits["train"]["tokens"] + splits["val"]["tokens"]) / max(1e-9, time.time() - t1)),
        )
        console.print(f"  {run_.metrics['train_tokens']:,} train / {run_.metrics['val_tokens']:,} val tokens, "
                      f"{run_.metrics['bytes_per_token']} bytes/token")
    return finished(out)
