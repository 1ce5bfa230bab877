"""RAG benchmark: index build speed, retrieval quality (dense / BM25 / hybrid) on the bundled QA set, query latency.

    .venv/bin/python bench/rag_bench.py [--docs data/kb/docs] [--qa data/kb/qa.jsonl] [--scale 10000]

1. Builds the knowledge base of ``--docs`` from scratch (MiniLM embedder) and prints chunks/s.
2. recall@1/5/10, MRR, nDCG@5 of each retrieval mode on the QA set (no LLM involved).
3. Query latency p50/p95 at ``--scale`` chunks: the real chunks and vectors are tiled (vectors with a little noise)
   up to that size, so faiss and BM25 do the work of an index that big; reported with and without the query
   embedding (MiniLM on this CPU), excluding generation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from lmforge.rag.chunking import Chunk
from lmforge.rag.evaluate import load_qa, retrieval_metrics
from lmforge.rag.index import KnowledgeBase
from lmforge.rag.stage import Config, build_index


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default="data/kb/docs")
    ap.add_argument("--qa", default="data/kb/qa.jsonl")
    ap.add_argument("--scale", type=int, default=10_000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        from lmforge.rag.embed import make_embedder

        emb = make_embedder("minilm")
        emb.embed(["warm up"])
        t0 = time.time()
        kb, report = build_index(Config(docs=args.docs), tmp, embedder=emb)
        dt = time.time() - t0
    print(f"\n## index build ({args.docs})")
    print(f"files {report['files']}, docs {report['docs']}, chunks {report['chunks']}, total {dt:.1f} s "
          f"→ {report['chunks'] / dt:.1f} chunks/s (embedding {report['embed_chunks_per_s']} chunks/s, "
          f"read+chunk {report['read_chunk_s']} s, faiss+bm25 {report['index_s']} s)")

    items = load_qa(args.qa)
    print(f"\n## retrieval on {args.qa} ({sum(1 for q in items if q.gold)} answerable questions)")
    print("| mode | recall@1 | recall@5 | recall@10 | MRR | nDCG@5 |\n|---|---|---|---|---|---|")
    for mode in ("dense", "bm25", "hybrid"):
        m = retrieval_metrics(kb, items, mode=mode, ks=(1, 5, 10))
        print(f"| {mode} | {m['recall@1']} | {m['recall@5']} | {m['recall@10']} | {m['mrr']} | {m['ndcg@5']} |")

    # latency at scale: tile the real chunks up to --scale
    reps = -(-args.scale // len(kb))
    rng = np.random.default_rng(0)
    chunks = [Chunk(**{**c.__dict__, "chunk_id": f"{c.chunk_id}~{r}"}) for r in range(reps) for c in kb.chunks]
    chunks = chunks[:args.scale]
    vecs = np.tile(kb.vectors, (reps, 1))[:args.scale] + rng.normal(0, 0.02, (len(chunks), kb.vectors.shape[1]))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time: OpenMP start-up costs more than it saves
    t0 = time.time()
    big = KnowledgeBase(chunks, vecs, kb.docs, kb.embedder_name)
    big.embedder = kb.embedder
    build_s = time.time() - t0
    questions = [q.question for q in items]
    qvecs = {q: big.embed_query(q) for q in questions}
    print(f"\n## query latency at {len(big):,} chunks (faiss {big.dense_kind}; index built in {build_s:.1f} s)")
    print("| path | p50 ms | p95 ms |\n|---|---|---|")
    for label, fn in [
        ("dense (faiss) only", lambda q: big.dense_search(qvecs[q], 50)),
        ("bm25 only", lambda q: big.bm25_search(q, 50)),
        ("hybrid retrieval, query vector given", None),
        ("hybrid incl. MiniLM query embedding", lambda q: big.search(q, k=5)),
    ]:
        if fn is None:  # hybrid without the embedding: swap the embedder for a lookup of precomputed vectors
            class Lookup:
                name = big.embedder_name

                def embed(self, texts):
                    return np.stack([qvecs[t] for t in texts])
            saved, big.embedder = big.embedder, Lookup()
            fn = lambda q: big.search(q, k=5)  # noqa: E731
        times = []
        for _ in range(3):
            for q in questions:
                t = time.perf_counter()
                fn(q)
                times.append((time.perf_counter() - t) * 1000)
        if label.startswith("hybrid retrieval"):
            big.embedder = saved
        print(f"| {label} | {statistics.median(times):.2f} | {pct(times, 95):.2f} |")


if __name__ == "__main__":
    main()
