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

    def __init__(self, folder: str | os.PathLike, split: str, vocab_size: int, shard_tokens: int = 50_000_000) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.dtype, self.shard_tokens = split, dtype_for(vocab_size), shard_tokens
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
        name = f"{self.split}-{len(self.shards):05d}.bin"
        with atomic_path(self.folder / name) as tmp:
            arr.tofile(tmp)
        self.shards.append({"file": name, "tokens": int(arr.size)})
        self._buf, self._buffered = [], 0

    def close(self) -> dict:
        self._flush()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "docs": self.docs,
                "bytes": self.bytes}


def write_index(folder: str | os.PathLike, vocab_size: int, eos_id: int, splits: dict[str, dict]) -> None:
    write_json(Path(folder) / INDEX, {"format": "lmforge-tokens-v1", "dtype": dtype_for(vocab_size).name,
                                      "vocab_size": vocab_size, "eos_id": eos_id, "splits": splits})


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
    arrays = [np.memmap(folder / s["file"], dtype=index["dtype"], mode="r") for s in index["splits"][split]["shards"]]
    if not arrays:
        return np.zeros(0, dtype=index["dtype"])
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


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
