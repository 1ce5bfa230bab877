"""The tokenizer stage: train a byte-level BPE on data artifacts' kept documents and pack train/val token shards.

Documents are split into train and validation by a hash of their id (stable when the corpus grows); the validation
text is what evaluation measures loss and bits-per-byte on.

With several ``data`` sources (a mixture) each source is packed into its own shards (``src0-train-00000.bin``, ...)
and ``index.json`` lists them with their normalised target ``weights``; pretraining samples the sources by those
weights.  The BPE is trained on every source's training documents; the weights only steer pretraining's sampling.
"""

from __future__ import annotations

import hashlib
import re
import os
import time
import shutil
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator, model_validator

from lmforge.artifacts import Manifest, is_artifact
from lmforge.config import StageConfig
from lmforge.data.io import iter_documents
from lmforge.progress import console, progress, rate_text
from lmforge.stages import begin, finished
from lmforge.tokenizer.bpe import EOS, IM_END, IM_START, SpecialTokens, load_tokenizer, train_bpe
from lmforge.tokenizer.shards import ShardWriter, merge_splits, write_index

STAGE = "tokenizer"
VERSION = "1"


class Config(StageConfig):
    """Train a byte-level BPE tokenizer on a data artifact and pack train/val token shards."""

    data: list[str] = Field(description="Data artifact folder(s) (output of `lmforge data run`) or JSONL(.zst) "
                                        "files; several make a mixture.")
    weights: list[float] = Field(default_factory=list,
                                 description="Mixture: target sampling weight per data source (empty: equal).")
    vocab_size: int = Field(4096, ge=259, le=1_000_000, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of documents held out for validation.")
    max_length: int = Field(2048, ge=16, description="model_max_length written to tokenizer_config.json.")
    batch_docs: int = Field(256, ge=1, description="Documents encoded per batch when packing.")
    shard_tokens: int = Field(50_000_000, ge=1000, description="Maximum tokens per .bin shard.")
    bos_token: str = Field(EOS, description="Beginning-of-sequence token.")
    eos_token: str = Field(EOS, description="End-of-sequence token; packed between documents.")
    pad_token: str = Field(EOS, description="Padding token.")
    chat_start_token: str = Field(IM_START, description="Opens a chat turn in the chat template (before the role).")
    chat_end_token: str = Field(IM_END, description="Closes a chat turn in the chat template.")
    extra_special_tokens: list[str] = Field(default_factory=list,
                                            description="Further reserved special tokens (never split, never merged).")
    from_tokenizer: Optional[str] = Field(None, description="Pack with this existing tokenizer folder (e.g. a model's, "
                                                            "for continued pretraining) instead of training a BPE.")

    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens(bos=self.bos_token, eos=self.eos_token, pad=self.pad_token,
                             chat_start=self.chat_start_token, chat_end=self.chat_end_token,
                             extra=tuple(self.extra_special_tokens))

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_weights(self) -> "Config":
        if not self.data:
            raise ValueError("data: give at least one data source")
        if self.weights and len(self.weights) != len(self.data):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.data)} data sources")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ValueError(f"weights: must be non-negative with a positive sum, got {self.weights}")
        self.special_tokens()  # raises ValueError naming the field
        return self


REPEAT_SUFFIX = re.compile(r"#rep\d+$")


def is_val(doc_id: str, fraction: float) -> bool:
    """Whether a document is held out: a hash of its id, where a mixing copy (``<id>#rep<k>``) counts as its
    original, so the copies of a held-out document never land in the training split."""
    doc_id = REPEAT_SUFFIX.sub("", doc_id)
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


REUSED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def reuse_tokenizer(folder: Path, out: Path):
    """Copy an existing tokenizer's files into ``out``; ``(tokenizer, eos id)`` with eos from its config."""
    tok, cfg = load_tokenizer(folder)
    eos_token = cfg.get("eos_token")
    if isinstance(eos_token, dict):  # transformers' AddedToken form
        eos_token = eos_token.get("content")
    eos = tok.token_to_id(eos_token) if eos_token else None
    if eos is None:
        raise ValueError(f"from_tokenizer: {folder}/tokenizer_config.json names no eos_token in the vocabulary "
                         f"(got {eos_token!r}); packing needs it between documents")
    out.mkdir(parents=True, exist_ok=True)
    for name in REUSED_FILES:
        if (folder / name).exists():
            shutil.copy(folder / name, out / name)
    console.print(f"  packing with the existing tokenizer {folder} (vocab {tok.get_vocab_size():,}, eos {eos_token!r})")
    return tok, eos


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    inputs = {("data" if i == 0 else f"data{i}"): d for i, d in enumerate(config.data)}
    if config.from_tokenizer:  # an artifact by run id; a plain folder by its tokenizer.json (not gigabytes of weights)
        src = Path(config.from_tokenizer)
        inputs["from_tokenizer"] = str(src if is_artifact(src) else src / "tokenizer.json")
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        t0 = time.time()
        per_source = []
        for path in config.data:
            docs = [(d["id"], d["text"]) for d in iter_documents(path) if d["text"]]
            if not docs:
                raise ValueError(f"{path}: no documents to train a tokenizer on")
            split = [(i, t, is_val(i, config.val_fraction)) for i, t in docs]
            if config.val_fraction > 0 and not any(v for *_, v in split):  # tiny corpora: hold out at least one doc
                i, t, _ = split[-1]
                split[-1] = (i, t, True)
            per_source.append(split)
        if config.from_tokenizer:
            tok, eos = reuse_tokenizer(Path(config.from_tokenizer), out)
        else:
            train_texts = [t for split in per_source for _, t, v in split if not v]
            console.print(f"  training BPE (vocab {config.vocab_size}) on {len(train_texts):,} documents, "
                          f"{sum(map(len, train_texts)) / 1e6:.1f}M chars")
            tok = train_bpe(train_texts, config.vocab_size, out, min_frequency=config.min_frequency,
                            max_length=config.max_length, length=len(train_texts), special=config.special_tokens())
            eos = tok.token_to_id(config.eos_token)
        t_train = time.time() - t0
        vocab = tok.get_vocab_size()
        mixture = len(config.data) > 1
        weights = config.weights or [1.0] * len(config.data)
        t1 = time.time()
        sources = []
        done = 0
        with progress() as bar:
            task = bar.add_task("packing tokens", total=sum(map(len, per_source)), rate="")
            for n, split in enumerate(per_source):
                prefix = f"src{n}-" if mixture else ""
                writers = {s: ShardWriter(out / "tokens", s, vocab, config.shard_tokens, prefix) for s in ("train", "val")}
                for start in range(0, len(split), config.batch_docs):
                    batch = split[start:start + config.batch_docs]
                    encoded = tok.encode_batch([t for _, t, _ in batch])
                    for (_, text, val), enc in zip(batch, encoded):
                        writers["val" if val else "train"].add(enc.ids + [eos], len(text.encode("utf-8")))
                    done += len(batch)
                    bar.update(task, completed=done, rate=rate_text(done, time.time() - t1, "docs"))
                sources.append({"name": f"src{n}", "path": str(config.data[n]), "weight": weights[n] / sum(weights),
                                "splits": {s: w.close() for s, w in writers.items()}})
        splits = {s: merge_splits([src["splits"][s] for src in sources]) for s in ("train", "val")}
        write_index(out / "tokens", vocab, eos, splits, sources if mixture else None)
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
