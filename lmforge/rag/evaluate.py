"""Evaluation against a QA set: retrieval metrics without any LLM, answer metrics when an answerer is given.

A QA file is JSONL, one question a line::

    {"id": "q01", "question": "...", "answers": ["gold answer", ...],
     "gold": [{"path": "django/faq/general.html", "quote": "exact text of the passage"}]}

``gold: []`` marks a question the knowledge base cannot answer (it counts for the refusal rate only).

* A retrieved chunk is *relevant* to a gold passage when it comes from the same path and covers at least half of the
  quote's characters (located by exact search in the indexed document text), so the metrics survive re-chunking.
* recall@k: share of gold passages found in the top k; MRR: 1 / rank of the first relevant chunk (0 if none in the
  top ``max(ks)``); nDCG@k: binary gains, ideal = min(k, number of relevant chunks in the index).
* answers: SQuAD-style exact match and token F1 (max over gold answers); lexical faithfulness: share of cited
  sentences whose content words are mostly (≥ 50 %) found in the sources they cite; model-judged faithfulness
  (``faithfulness_judged``): share of cited sentences a yes/no ``Judge`` (the served model with output constrained to
  yes / no) finds supported by the sources they cite.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.rag.index import Filters, KnowledgeBase, Mode, bm25_tokens
from lmforge.rag.judge import Judge, support_messages


@dataclass
class QAItem:
    id: str
    question: str
    answers: list[str]
    gold: list[dict[str, str]]  # [{"path", "quote"}]


def load_qa(path: str | Path) -> list[QAItem]:
    """Read a QA JSONL file; a bad line raises ``ValueError`` naming file and line."""
    items = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            gold = obj.get("gold", [])
            if not isinstance(obj["question"], str) or not all("path" in g and "quote" in g for g in gold):
                raise KeyError("gold entries need 'path' and 'quote'")
            items.append(QAItem(str(obj.get("id", lineno)), obj["question"], list(obj.get("answers", [])), gold))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{lineno}: bad QA line ({type(err).__name__}: {err})") from None
    return items


def _gold_spans(kb: KnowledgeBase, item: QAItem) -> list[tuple[str, int, int]]:
    spans = []
    for g in item.gold:
        text = kb.doc_text(g["path"]) or ""
        pos = text.find(g["quote"])
        if pos < 0:  # tolerate whitespace differences
            m = re.search(r"\s+".join(map(re.escape, g["quote"].split())), text)
            pos = m.start() if m else -1
            end = m.end() if m else -1
        else:
            end = pos + len(g["quote"])
        spans.append((g["path"], pos, end))
    return spans


def relevant(chunk, span: tuple[str, int, int]) -> bool:
    path, s, e = span
    if chunk.path != path or s < 0:
        return False
    overlap = min(chunk.end, e) - max(chunk.start, s)
    return overlap >= 0.5 * (e - s)


def retrieval_metrics(kb: KnowledgeBase, items: list[QAItem], mode: Mode = "hybrid", ks: tuple[int, ...] = (1, 5, 10),
                      filters: Filters | None = None) -> dict[str, Any]:
    """recall@k, MRR and nDCG@k of ``mode`` over the answerable questions."""
    depth = max(ks)
    recall = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    mrr, n, missing = 0.0, 0, 0
    for item in items:
        spans = _gold_spans(kb, item)
        if not spans:
            continue
        missing += sum(1 for _, s, _ in spans if s < 0)
        n += 1
        hits = kb.search(item.question, k=depth, mode=mode, filters=filters)
        rel = [any(relevant(h.chunk, sp) for sp in spans) for h in hits]
        first = next((r for r, ok in enumerate(rel, 1) if ok), None)
        mrr += 1.0 / first if first else 0.0
        n_rel_total = sum(1 for c in kb.chunks if any(relevant(c, sp) for sp in spans))
        for k in ks:
            found = sum(1 for sp in spans if any(relevant(h.chunk, sp) for h in hits[:k]))
            recall[k] += found / len(spans)
            dcg = sum(1.0 / math.log2(r + 1) for r, ok in enumerate(rel[:k], 1) if ok)
            idcg = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, n_rel_total) + 1))
            ndcg[k] += dcg / idcg if idcg else 0.0
    out: dict[str, Any] = {"mode": mode, "questions": n, "gold_not_found_in_index": missing}
    for k in ks:
        out[f"recall@{k}"] = round(recall[k] / max(n, 1), 4)
        out[f"ndcg@{k}"] = round(ndcg[k] / max(n, 1), 4)
    out["mrr"] = round(mrr / max(n, 1), 4)
    return out


def refusal_tradeoff(kb: KnowledgeBase, items: list[QAItem], thresholds: list[float], k: int = 4,
                     mode: Mode = "hybrid") -> list[dict[str, Any]]:
    """For each ``min_score`` threshold: how many answerable questions would be refused (best retrieved cosine
    below it: a false refusal) and how many unanswerable ones would be (correct).  Retrieval only, no LLM."""
    best = [(bool(item.gold), max((h.dense_score for h in kb.search(item.question, k=k, mode=mode)), default=0.0))
            for item in items]
    n_ans = sum(1 for a, _ in best if a)
    n_un = len(best) - n_ans
    return [{"min_score": t, "false_refusals": sum(1 for a, s in best if a and s < t), "answerable": n_ans,
             "refused_unanswerable": sum(1 for a, s in best if not a and s < t), "unanswerable": n_un}
            for t in thresholds]


# ----------------------------------------------------------------------------------------------------------------------
# answers


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation) | {"“", "”", "’", "‘"})
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers)) if answers else 0.0


def f1_score(prediction: str, answers: list[str]) -> float:
    best = 0.0
    p = normalize_answer(prediction).split()
    for a in answers:
        g = normalize_answer(a).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_SENT = re.compile(r"(?<=[.!?。！？])\s+")


def faithfulness(answer: str, sources: dict[int, str], threshold: float | None = None) -> dict[str, Any]:
    """Lexical check: every sentence with citations is scored against the cited sources' text with
    ``lmforge.rag.answer.support_score`` (content words and adjacent word pairs); supported when ≥ ``threshold``
    (default: the attribution threshold).  Returns counts and the supported share (None: nothing cited)."""
    from lmforge.rag.answer import SUPPORT_THRESHOLD, support_score

    threshold = SUPPORT_THRESHOLD if threshold is None else threshold
    cited, supported, details = 0, 0, []
    for sent in _SENT.split(answer):
        nums = [int(n) for m in _CITE.finditer(sent) for n in m.group(1).split(",")]
        if not nums:
            continue
        cited += 1
        share = max((support_score(sent, sources[n]) for n in nums if n in sources), default=0.0)
        ok = share >= threshold and all(n in sources for n in nums)
        supported += ok
        details.append({"sentence": sent, "cites": nums, "overlap": round(share, 3), "supported": ok})
    return {"cited_sentences": cited, "supported_sentences": supported,
            "faithfulness": round(supported / cited, 4) if cited else None, "sentences": details}


def faithfulness_judged(answer: str, sources: dict[int, str], judge: Judge, threshold: float = 0.5) -> dict[str, Any]:
    """Model-judged check: each sentence with citations is asked about (yes / no, constrained) against the text of
    the sources it cites; supported when P(yes) ≥ ``threshold``.  A citation of an unknown source is unsupported.
    Same shape as ``faithfulness``."""
    cited = []
    for sent in _SENT.split(answer):
        nums = [int(n) for m in _CITE.finditer(sent) for n in m.group(1).split(",")]
        if nums:
            cited.append((sent, nums))
    asks = [support_messages(re.sub(r"\s+([.,;:!?])", r"\1", _CITE.sub("", s)).strip(),
                             "\n\n".join(sources.get(n, "") for n in nums))
            for s, nums in cited]
    probs = judge.yes_probabilities(asks) if asks else []
    details = []
    for (sent, nums), p in zip(cited, probs):
        ok = p >= threshold and all(n in sources for n in nums)
        details.append({"sentence": sent, "cites": nums, "p_yes": round(p, 4), "supported": ok})
    supported = sum(d["supported"] for d in details)
    return {"cited_sentences": len(cited), "supported_sentences": supported,
            "faithfulness": round(supported / len(cited), 4) if cited else None, "sentences": details}


def answer_metrics(answerer, items: list[QAItem], judge: Judge | None = None) -> dict[str, Any]:
    """EM / F1 (answerable questions), lexical faithfulness (and model-judged with ``judge``), refusal rates, from
    ``answerer.ask`` (lmforge.rag.answer); ``answers_citing_by_model`` / ``_by_attribution`` count answers with at
    least one citation of each ``method``."""
    em = f1 = 0.0
    faith_sum, faith_n, answerable, refused_ok, unanswerable, false_refusals = 0.0, 0, 0, 0, 0, 0
    judged_sum, judged_n = 0.0, 0
    by_method = Counter()
    rows = []
    for item in items:
        res = answerer.ask(item.question)
        if item.gold:
            answerable += 1
            em += exact_match(res.answer, item.answers)
            f1 += f1_score(res.answer, item.answers)
            false_refusals += res.refused
        else:
            unanswerable += 1
            refused_ok += res.refused
        fa = faithfulness(res.answer, {s.number: s.text for s in res.sources})
        if fa["faithfulness"] is not None:
            faith_sum += fa["faithfulness"]
            faith_n += 1
        methods = {c.method or "model" for c in res.citations}
        by_method.update(methods)
        row = {"id": item.id, "question": item.question, "answer": res.answer, "refused": res.refused,
               "cited": [c.number for c in res.citations], "citation_methods": sorted(methods),
               "faithfulness": fa["faithfulness"]}
        if judge is not None and fa["cited_sentences"]:
            fj = faithfulness_judged(res.answer, {s.number: s.text for s in res.sources}, judge)
            judged_sum += fj["faithfulness"]
            judged_n += 1
            row["faithfulness_judged"] = fj["faithfulness"]
        rows.append(row)
    return {"answerable": answerable, "exact_match": round(em / max(answerable, 1), 4),
            "f1": round(f1 / max(answerable, 1), 4),
            "faithfulness": round(faith_sum / faith_n, 4) if faith_n else None, "answers_with_citations": faith_n,
            "faithfulness_judged": round(judged_sum / judged_n, 4) if judged_n else None,
            "answers_citing_by_model": by_method["model"], "answers_citing_by_attribution": by_method["attributed"],
            "false_refusals": false_refusals, "unanswerable": unanswerable,
            "refusal_rate_unanswerable": round(refused_ok / unanswerable, 4) if unanswerable else None,
            "rows": rows}
