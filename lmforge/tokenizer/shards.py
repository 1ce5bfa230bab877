"""Packed token shards: flat ``.bin`` files of token ids (uint16 when the vocabulary fits, else uint32) + ``index.json``.

Every document is followed by the end-of-text token, so document boundaries survive packing.  ``index.json`` records,
per split, the shard files, their token counts, the number of documents and the UTF-8 bytes of the text they hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.artifacts import atomic_path, write_json

INDEX = "index.json"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to ``{split}-NNNNN.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, folder: str | os.PathLike, split: str, vocab_size: int, shard_tokens: int = 50_000_000,
                 prefix: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.dtype, self.shard_tokens = split, dtype_for(vocab_size), shard_tokens
        self.prefix = prefix
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.docs = 0
        self.bytes = 0

    def add(self, ids: list[int] | np.ndarray, text_bytes: int) -> None:
        self._buf.append(np.asarray(ids, dtype=self.dtype))
        self._buffered += len(ids)
        self.docs += 1
        self.bytes += text_bytes
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        arr = np.concatenate(self._buf)
        name = f"{self.prefix}{self.split}-{len(self.shards):05d}.bin"
        with atomic_path(self.folder / name) as tmp:
            arr.tofile(tmp)
        self.shards.append({"file": name, "tokens": int(arr.size)})
        self._buf, self._buffered = [], 0

    def close(self) -> dict:
        self._flush()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "docs": self.docs,
                "bytes": self.bytes}


def merge_splits(parts: list[dict]) -> dict:
    """One split summary (shards, tokens, docs, bytes) covering several sources' summaries of that split."""
    return {"shards": [s for p in parts for s in p["shards"]], "tokens": sum(p["tokens"] for p in parts),
            "docs": sum(p["docs"] for p in parts), "bytes": sum(p["bytes"] for p in parts)}


def write_index(folder: str | os.PathLike, vocab_size: int, eos_id: int, splits: dict[str, dict],
                sources: list[dict] | None = None) -> None:
    """``splits`` covers every source; ``sources`` (a mixture) lists ``{name, weight, splits}`` per source."""
    index = {"format": "lmforge-tokens-v1", "dtype": dtype_for(vocab_size).name, "vocab_size": vocab_size,
             "eos_id": eos_id, "splits": splits}
    if sources:
        index["sources"] = sources
    write_json(Path(folder) / INDEX, index)


def read_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no token shards ({INDEX} missing); run the tokenizer stage")
    return json.loads(path.read_text())


def load_split(folder: str | os.PathLike, split: str) -> np.ndarray:
    """All tokens of one split as one read-only memory-mapped (or concatenated) array."""
    folder = Path(folder)
    index = read_index(folder)
    if split not in index["splits"]:
        raise KeyError(f"{folder}: no split {split!r} (have {sorted(index['splits'])})")
    return _load_shards(folder, index["splits"][split]["shards"], index["dtype"])


def _load_shards(folder: Path, shards: list[dict], dtype: str) -> np.ndarray:
    arrays = [np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in shards]
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def load_sources(folder: str | os.PathLike, split: str) -> list[tuple[str, float, np.ndarray]]:
    """``(name, target weight, tokens)`` per mixture source of ``split``; one source when the shards hold no mixture."""
    folder = Path(folder)
    index = read_index(folder)
    if "sources" not in index:
        return [("all", 1.0, load_split(folder, split))]
    return [(s["name"], float(s["weight"]), _load_shards(folder, s["splits"][split]["shards"], index["dtype"]))
            for s in index["sources"]]


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Consecutive non-overlapping windows covering ``tokens`` (the last partial one included)."""
    n = len(tokens) - 1
    count = 0
    for start in range(0, n, seq_len):
        end = min(start + seq_len, n)
        if end - start < 1:
            break
        w = torch.from_numpy(np.asarray(tokens[start:end + 1], dtype=np.int64))
        yield w[None, :-1], w[None, 1:]
        count += 1
        if max_windows is not None and count >= max_windows:
            break
