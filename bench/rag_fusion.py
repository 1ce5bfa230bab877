"""Hybrid retrieval: which fusion settings (weights, RRF k, per-retriever depth) work, measured on several knowledge
bases.  Each question's dense and BM25 rankings are computed once (100 deep), then every setting is fused offline.

    PYTHONPATH=. python bench/rag_fusion.py --kb INDEX_DIR QA.jsonl [--kb INDEX_DIR2 QA2.jsonl ...]

Prints span recall@5 and MRR@10 per knowledge base for dense-only, BM25-only and a grid of hybrid settings, and the
settings ranked by their mean recall@5 over the knowledge bases (ties: mean MRR).  No cross-encoder re-ranker ships
in any package that works offline here (docs/RESOURCES), so none is measured.
"""

from __future__ import annotations

import argparse
import itertools

from lmforge.rag.evaluate import _gold_spans, load_qa, relevant
from lmforge.rag.index import KnowledgeBase

DEPTH = 100
WEIGHTS = [(1.0, 1.0), (1.0, 0.75), (1.0, 0.5), (1.0, 0.25), (0.75, 1.0), (0.5, 1.0)]
RRF_KS = [5, 20, 60, 100]
DEPTHS = [10, 20, 50, 100]


def rankings(kb: KnowledgeBase, qa_path: str):
    rows = []
    for item in load_qa(qa_path):
        spans = _gold_spans(kb, item)
        if not spans:
            continue
        dense = [i for i, _ in kb.dense_search(kb.embed_query(item.question), DEPTH)]
        sparse = [i for i, _ in kb.bm25_search(item.question, DEPTH)]
        rel = {i for i in set(dense) | set(sparse) if any(relevant(kb.chunks[i], sp) for sp in spans)}
        span_of = {i: [j for j, sp in enumerate(spans) if relevant(kb.chunks[i], sp)] for i in rel}
        rows.append((dense, sparse, span_of, len(spans)))
    return rows


def fuse(dense, sparse, wd, wb, k, depth):
    score: dict[int, float] = {}
    for w, ranking in ((wd, dense[:depth]), (wb, sparse[:depth])):
        for r, i in enumerate(ranking, 1):
            score[i] = score.get(i, 0.0) + w / (k + r)
    return [i for i, _ in sorted(score.items(), key=lambda x: (-x[1], x[0]))]


def metrics(rows, order_fn) -> tuple[float, float]:
    rec = mrr = 0.0
    for dense, sparse, span_of, n_spans in rows:
        order = order_fn(dense, sparse)
        found = {j for i in order[:5] for j in span_of.get(i, [])}
        rec += len(found) / n_spans
        first = next((r for r, i in enumerate(order[:10], 1) if i in span_of), None)
        mrr += 1.0 / first if first else 0.0
    return rec / len(rows), mrr / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", nargs=2, action="append", metavar=("INDEX", "QA"), required=True)
    args = ap.parse_args()
    settings = {"dense only": lambda d, s: d, "bm25 only": lambda d, s: s}
    for (wd, wb), k, depth in itertools.product(WEIGHTS, RRF_KS, DEPTHS):
        settings[f"hybrid w={wd:g}/{wb:g} k={k} depth={depth}"] = (
            lambda d, s, wd=wd, wb=wb, k=k, depth=depth: fuse(d, s, wd, wb, k, depth))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    names = []
    for index, qa in args.kb:
        kb = KnowledgeBase.load(index)
        rows = rankings(kb, qa)
        names.append(f"{index} ({len(rows)} q)")
        for name, fn in settings.items():
            results[name].append(metrics(rows, fn))
    print("| setting | " + " | ".join(f"{n}: recall@5 / MRR@10" for n in names) + " | mean recall@5 |")
    print("|---|" + "---|" * (len(names) + 1))
    ranked = sorted(results.items(), key=lambda kv: (-sum(r for r, _ in kv[1]), -sum(m for _, m in kv[1])))
    default = "hybrid w=1/1 k=60 depth=50"
    for name, res in ranked:
        if name in ("dense only", "bm25 only", default) or ranked.index((name, res)) < 12:
            cells = " | ".join(f"{r:.3f} / {m:.3f}" for r, m in res)
            print(f"| {name}{' (old default)' if name == default else ''} | {cells} | "
                  f"{sum(r for r, _ in res) / len(res):.3f} |")


if __name__ == "__main__":
    main()
