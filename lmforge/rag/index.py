"""The knowledge base: chunks (Parquet) + dense vectors (faiss) + BM25 (bm25s), searched with reciprocal-rank fusion.

On disk (inside a ``rag_index`` artifact folder)::

    CURRENT                      name of the live version (written atomically: the swap)
    versions/<id>/chunks.parquet one row per chunk: id, path, type, title, heading_path, start, end, text, ...
    versions/<id>/docs.parquet   one row per document: path, type, title, text, file_sha256, encoding
    versions/<id>/files.json     per file: sha256 and how it was ingested or why it was skipped
    versions/<id>/vectors.npy    float32 (n_chunks, dim), unit rows: incremental re-index reuses them
    versions/<id>/dense.faiss    flat / HNSW / IVF inner-product index
    versions/<id>/bm25/          bm25s index
    versions/<id>/info.json      embedder, index type, counts

A new version is written completely into its own folder, then ``CURRENT`` is replaced in one rename, then old
versions are removed: a crash at any point leaves the previous version live and whole.

The dense index type is chosen from the size (``auto``: flat below ``hnsw_min_chunks``, HNSW above) or forced
(``flat`` / ``hnsw`` / ``ivf``).  BM25 tokens are lower-cased words (English stop words dropped); Chinese /
Japanese / Korean runs, which have no spaces, become tokens one of two ways (``bm25_cjk``, recorded in the index's
build settings so queries are cut the same way): ``bigram`` (single characters plus character bigrams: no
dictionary, any CJK language; the default, measured best on the bundled Chinese QA set, docs/rag_results.md) or
``jieba`` (Chinese words from the jieba segmenter in search mode, which also emits the shorter words inside a long one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.artifacts import write_json, write_text
from lmforge.rag.chunking import Chunk
from lmforge.rag.embed import Embedder, query_vector
from lmforge.rag.ingest import SourceDoc

Mode = Literal["hybrid", "dense", "bm25"]
IndexType = Literal["auto", "flat", "hnsw", "ivf"]

# hybrid fusion defaults, measured on two knowledge bases (docs/benchmarks.md, "RAG: hybrid fusion settings"):
# score = DENSE_WEIGHT / (RRF_K + dense rank) + BM25_WEIGHT / (RRF_K + BM25 rank), each retriever CANDIDATES deep.
# The textbook setting (equal weights, k = 60, 50 deep) lost recall@5 on paraphrased FAQ questions (0.81 vs dense 1.0):
# BM25's wrong-but-wordy hits pushed the right chunk out; a small k and a light BM25 weight keep dense's top ranks.
RRF_K = 5
DENSE_WEIGHT = 1.0
BM25_WEIGHT = 0.25
CANDIDATES = 20

_STOP = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they this "
    "to was will with i you he she we do does did can how what why when which who whom where my your me our its".split())
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_CJK_RUN = re.compile(rf"^[{_CJK}]+$")


CJKTokens = Literal["bigram", "jieba"]


def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on stderr
    return jieba


def bm25_tokens(text: str, cjk: CJKTokens = "bigram") -> list[str]:
    """Words (lower-cased, stop words dropped); CJK runs → characters + bigrams (``bigram``) or jieba search-mode
    words (``jieba``)."""
    out: list[str] = []
    for tok in _TOKEN.findall(text.lower()):
        if _CJK_RUN.match(tok):
            if cjk == "jieba":
                out.extend(_jieba().lcut_for_search(tok))
            else:
                out.extend(tok)
                out.extend(tok[i:i + 2] for i in range(len(tok) - 1))
        elif tok not in _STOP:
            out.append(tok.replace("’", "'"))
    return out


@dataclass
class Filters:
    """Metadata filters: a chunk passes when its path starts with ``path_prefix`` and its type is in ``types``."""

    path_prefix: str | None = None
    types: list[str] | None = None

    def active(self) -> bool:
        return bool(self.path_prefix or self.types)


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the ranking score of the mode (RRF for hybrid, cosine for dense, BM25 for bm25)
    dense_score: float  # cosine similarity of query and chunk: what the relevance threshold looks at
    bm25_score: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)  # rank in each retriever (1-based)


def build_dense_index(vectors: np.ndarray, index_type: IndexType = "auto", hnsw_min_chunks: int = 50_000,
                      hnsw_m: int = 32, ivf_lists: int = 0):
    """An inner-product faiss index over unit vectors; returns (index, the type actually used)."""
    import faiss

    n, dim = vectors.shape
    kind = index_type if index_type != "auto" else ("hnsw" if n >= hnsw_min_chunks else "flat")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    elif kind == "ivf":
        nlist = ivf_lists or max(1, min(int(4 * np.sqrt(max(n, 1))), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, nlist // 8)
    else:
        raise ValueError(f"unknown index type {index_type!r} (auto, flat, hnsw or ivf)")
    if n:
        index.add(vectors)
    return index, kind


_CHUNK_COLUMNS = ["chunk_id", "path", "type", "title", "heading_path", "start", "end", "text", "n_tokens",
                  "file_sha256"]


class KnowledgeBase:
    """Chunks + vectors + faiss + BM25 in memory; ``save`` / ``load`` persist them (see the module doc)."""

    def __init__(self, chunks: list[Chunk], vectors: np.ndarray, docs: list[SourceDoc], embedder_name: str,
                 *, files: dict | None = None, index_type: IndexType = "auto", hnsw_min_chunks: int = 50_000,
                 dense_index=None, dense_kind: str | None = None, bm25=None, build: dict | None = None) -> None:
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        self.chunks = chunks
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.docs = docs
        self.embedder_name = embedder_name
        self.files = files or {}
        self.build = build or {}  # the settings it was built with (chunk sizes, embedder): re-use needs a match
        self.bm25_cjk: CJKTokens = self.build.get("bm25_cjk", "bigram")  # indexes from before the switch: bigram
        self.embedder: Embedder | None = None
        if dense_index is None:
            dense_index, dense_kind = build_dense_index(self.vectors, index_type, hnsw_min_chunks)
        self.dense, self.dense_kind = dense_index, dense_kind or "flat"
        self.bm25 = bm25 if bm25 is not None else self._build_bm25()
        self._types = np.array([c.type for c in chunks]) if chunks else np.array([], dtype=str)
        self._paths = [c.path for c in chunks]
        self._lock = threading.Lock()  # one search at a time: the embedder and bm25s are not meant for threads

    def __len__(self) -> int:
        return len(self.chunks)

    def _build_bm25(self):
        import bm25s

        retriever = bm25s.BM25()
        corpus = [bm25_tokens(c.search_text(), self.bm25_cjk) or [""] for c in self.chunks]
        if corpus:
            retriever.index(corpus, show_progress=False)
        return retriever

    # -- retrieval ---------------------------------------------------------------------------------------------------
    def _allowed(self, filters: Filters | None) -> np.ndarray | None:
        if filters is None or not filters.active():
            return None
        mask = np.ones(len(self.chunks), dtype=bool)
        if filters.path_prefix:
            mask &= np.array([p.startswith(filters.path_prefix) for p in self._paths], dtype=bool)
        if filters.types:
            mask &= np.isin(self._types, [t.lower().lstrip(".") for t in filters.types])
        return mask

    def dense_search(self, query_vec: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        import faiss

        if not len(self.chunks) or k <= 0:
            return []
        kind = self.dense_kind
        sel = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype("int64")) if allowed is not None else None
        if kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * k))
        elif kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.dense.nprobe)
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        scores, ids = self.dense.search(query_vec.reshape(1, -1).astype(np.float32), min(k, len(self.chunks)),
                                        params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def bm25_search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        tokens = bm25_tokens(query, self.bm25_cjk)
        if not tokens or not len(self.chunks) or k <= 0:
            return []
        weight = allowed.astype(np.float32) if allowed is not None else None
        docs, scores = self.bm25.retrieve([tokens], k=min(k, len(self.chunks)), show_progress=False,
                                          weight_mask=weight)
        return [(int(i), float(s)) for i, s in zip(docs[0], scores[0]) if s > 0]

    def embed_query(self, query: str) -> np.ndarray:
        if self.embedder is None:
            raise RuntimeError("no embedder attached: use KnowledgeBase.load(folder) or set kb.embedder")
        return query_vector(self.embedder, query)

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid", filters: Filters | None = None,
               candidates: int | None = None, dense_weight: float | None = None, bm25_weight: float | None = None,
               rrf_k: int | None = None) -> list[Hit]:
        """Top-``k`` chunks for ``query``.  ``hybrid`` fuses the dense and BM25 rankings (each ``candidates`` deep)
        with weighted reciprocal-rank fusion: score = dense_weight / (rrf_k + dense rank) + bm25_weight / (rrf_k +
        BM25 rank); the defaults are the module's measured ``CANDIDATES``, ``DENSE_WEIGHT``, ``BM25_WEIGHT``,
        ``RRF_K``."""
        if mode not in ("hybrid", "dense", "bm25"):
            raise ValueError(f"unknown search mode {mode!r} (hybrid, dense or bm25)")
        fusion = (DENSE_WEIGHT if dense_weight is None else dense_weight,
                  BM25_WEIGHT if bm25_weight is None else bm25_weight, RRF_K if rrf_k is None else rrf_k)
        with self._lock:
            return self._search(query, k, mode, filters, CANDIDATES if candidates is None else candidates, fusion)

    def _search(self, query: str, k: int, mode: Mode, filters: Filters | None, candidates: int,
                fusion: tuple[float, float, int] = (DENSE_WEIGHT, BM25_WEIGHT, RRF_K)) -> list[Hit]:
        allowed = self._allowed(filters)
        if allowed is not None and not allowed.any():
            return []
        depth = max(k, candidates)
        qvec = self.embed_query(query) if mode != "bm25" or self.embedder is not None else None
        dense = self.dense_search(qvec, depth if mode == "hybrid" else k, allowed) if mode != "bm25" else []
        sparse = self.bm25_search(query, depth if mode == "hybrid" else k, allowed) if mode != "dense" else []
        ranks: dict[int, dict[str, int]] = {}
        for name, results in (("dense", dense), ("bm25", sparse)):
            for r, (i, _) in enumerate(results, 1):
                ranks.setdefault(i, {})[name] = r
        bm25_scores = dict(sparse)
        if mode == "dense":
            order = [(i, s) for i, s in dense]
        elif mode == "bm25":
            order = list(sparse)
        else:
            weights = {"dense": fusion[0], "bm25": fusion[1]}
            fused = {i: sum(weights[name] / (fusion[2] + r) for name, r in rk.items()) for i, rk in ranks.items()}
            order = sorted(fused.items(), key=lambda x: (-x[1], x[0]))
        order = order[:k]
        if qvec is not None and order:
            cos = self.vectors[[i for i, _ in order]] @ qvec
        else:
            cos = np.zeros(len(order), dtype=np.float32)
        return [Hit(self.chunks[i], float(s), float(c), bm25_scores.get(i, 0.0), ranks.get(i, {}))
                for (i, s), c in zip(order, cos)]

    def doc_text(self, path: str) -> str | None:
        for d in self.docs:
            if d.path == path:
                return d.text
        return None

    # -- persistence -------------------------------------------------------------------------------------------------
    def save(self, root: str | os.PathLike, keep_old: bool = False) -> Path:
        """Write a new version under ``root/versions/`` and make it live (atomic ``CURRENT`` swap)."""
        import bm25s  # noqa: F401  (the bm25 object saves itself)
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        root = Path(root)
        name = uuid.uuid4().hex[:12]
        final = root / "versions" / name
        tmp = root / "versions" / f".{name}.partial"
        tmp.mkdir(parents=True)
        rows = {col: [getattr(c, col) for c in self.chunks] for col in _CHUNK_COLUMNS}
        schema = pa.schema([("chunk_id", pa.string()), ("path", pa.string()), ("type", pa.string()),
                            ("title", pa.string()), ("heading_path", pa.list_(pa.string())), ("start", pa.int64()),
                            ("end", pa.int64()), ("text", pa.string()), ("n_tokens", pa.int64()),
                            ("file_sha256", pa.string())])
        pq.write_table(pa.Table.from_pydict(rows, schema=schema), tmp / "chunks.parquet")
        docs = {"path": [d.path for d in self.docs], "type": [d.type for d in self.docs],
                "title": [d.title for d in self.docs], "text": [d.text for d in self.docs],
                "file_sha256": [d.file_sha256 for d in self.docs], "encoding": [d.encoding for d in self.docs]}
        pq.write_table(pa.table(docs), tmp / "docs.parquet")
        np.save(tmp / "vectors.npy", self.vectors)
        faiss.write_index(self.dense, str(tmp / "dense.faiss"))
        if self.chunks:
            self.bm25.save(str(tmp / "bm25"))
        write_json(tmp / "files.json", self.files)
        write_json(tmp / "info.json", {"embedder": self.embedder_name, "dense_index": self.dense_kind,
                                       "chunks": len(self.chunks), "docs": len(self.docs), "build": self.build,
                                       "dim": int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0})
        os.replace(tmp, final)
        write_text(root / "CURRENT", name + "\n")  # the swap: readers follow CURRENT
        if not keep_old:
            for old in (root / "versions").iterdir():
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def live_version(root: str | os.PathLike) -> Path | None:
        root = Path(root)
        try:
            name = (root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        folder = root / "versions" / name
        return folder if folder.is_dir() else None

    @classmethod
    def load(cls, root: str | os.PathLike, embedder: Embedder | None = None, *, with_embedder: bool = True,
             ) -> "KnowledgeBase":
        """Load the live version; attach ``embedder`` (default: the one named in ``info.json``, MiniLM)."""
        import bm25s
        import faiss
        import pyarrow.parquet as pq

        folder = cls.live_version(root)
        if folder is None:
            raise FileNotFoundError(f"{root}: no knowledge base here (no CURRENT version; run `lmforge rag index`)")
        info = json.loads((folder / "info.json").read_text())
        table = pq.read_table(folder / "chunks.parquet").to_pydict()
        chunks = [Chunk(**{col: table[col][i] for col in _CHUNK_COLUMNS}) for i in range(len(table["chunk_id"]))]
        dt = pq.read_table(folder / "docs.parquet").to_pydict()
        encodings = dt.get("encoding") or [""] * len(dt["path"])  # indexes written before encodings were recorded
        docs = [SourceDoc(dt["path"][i], dt["type"][i], dt["text"][i], dt["title"][i], file_sha256=dt["file_sha256"][i],
                          encoding=encodings[i] or "")
                for i in range(len(dt["path"]))]
        vectors = np.load(folder / "vectors.npy")
        dense = faiss.read_index(str(folder / "dense.faiss"))
        bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False) if chunks else None
        kb = cls(chunks, vectors, docs, info["embedder"], files=json.loads((folder / "files.json").read_text()),
                 dense_index=dense, dense_kind=info["dense_index"], bm25=bm25, build=info.get("build"))
        if embedder is not None:
            kb.embedder = embedder
        elif with_embedder:
            kb.embedder = embedder_for(info["embedder"])
        return kb


def embedder_for(name: str) -> Embedder:
    """The embedder an index was built with, from the name stored in ``info.json``."""
    from lmforge.rag.embed import make_embedder

    if name.startswith("openai:"):
        raise ValueError(f"this index was built with {name}: pass the same embedder (base_url) to load it")
    if name.startswith("st:"):
        return make_embedder("st", model=name[3:])
    if name == "multilingual-e5-small":
        return make_embedder("e5")
    return make_embedder("minilm")
