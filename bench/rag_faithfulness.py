"""Faithfulness of cited answers on the bundled knowledge base, and the support threshold behind attribution.

    PYTHONPATH=. python bench/rag_faithfulness.py --index /tmp/kb [--generate N] [--answers answers.jsonl]

1. Threshold: every gold quote of data/kb/qa.jsonl found in its question's retrieved sources (k = 3, hybrid), and a
   condensed restatement of it ("According to the documentation, <quote up to its answer>."), are sentences those
   sources support; the quote with its answer replaced by another question's answer (a fluent, on-topic, wrong
   sentence - what a small model writes) and another question's gold quote that is not in these sources are
   sentences they do not support.  For each support threshold the
   table gives how often a supported sentence gets a citation (recall) and how often a citation lands on a supported
   sentence (precision), for the old measure (share of content words) and the new one (``support_score``).
2. Answers (``--generate N``): SmolLM2-135M-Instruct answers the first N questions (greedy, k = 3, 64 tokens), raw
   text saved to ``--answers``; then each answer is attributed the old way and the new way and every cited sentence is
   checked against the gold: faithful when it contains a gold answer string or shares a 4-word run with a gold quote.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from lmforge.rag.answer import Source
from lmforge.rag.evaluate import load_qa


def sources_for(kb, question: str, k: int = 3) -> list[Source]:
    hits = kb.search(question, k=k, mode="hybrid")
    return [Source(i, h.chunk.path, h.chunk.title, list(h.chunk.heading_path), h.chunk.start, h.chunk.end,
                   h.chunk.text, h.dense_score) for i, h in enumerate(hits, 1)]


def labelled_sentences(kb, items) -> list[tuple[str, list[Source], bool]]:
    answerable = [it for it in items if it.gold]
    out = []
    for i, it in enumerate(answerable):
        srcs = sources_for(kb, it.question)
        quote = it.gold[0]["quote"]
        if not any(quote in s.text for s in srcs):
            continue  # retrieval missed the gold passage: nothing to attribute to
        out.append((quote, srcs, True))
        # a condensed restatement, as a model writes it: the quote up to its answer, plus "According to the docs"
        ans = next((a for a in it.answers if a in quote), None)
        if ans and quote.index(ans) + len(ans) < len(quote) - 3:
            out.append(("According to the documentation, " + quote[: quote.index(ans) + len(ans)] + ".", srcs, True))
        other = answerable[(i + 7) % len(answerable)]
        swapped = next((quote.replace(a, other.answers[0]) for a in it.answers if a in quote), None)
        if swapped and swapped != quote:
            out.append((swapped, srcs, False))  # fluent, on-topic, wrong
        if not any(other.gold[0]["quote"] in s.text for s in srcs):
            out.append((other.gold[0]["quote"], srcs, False))  # true elsewhere, not in these sources
    return out


def threshold_table(rows) -> None:
    from lmforge.rag.answer import lexical_support, support_score
    from lmforge.rag.index import bm25_tokens

    def old(sent, srcs):
        return max(lexical_support(sent, set(bm25_tokens(s.text))) for s in srcs)

    def new(sent, srcs):
        return max(support_score(sent, s.text) for s in srcs)

    pos = sum(1 for _, _, y in rows if y)
    print(f"{len(rows)} sentences ({pos} supported, {len(rows) - pos} not)")
    print("| measure | threshold | recall (supported cited) | precision (citations on supported) | accuracy |")
    print("|---|---|---|---|---|")
    for name, fn in (("content-word share (old)", old), ("support_score (new)", new)):
        scores = [(fn(s, srcs), y) for s, srcs, y in rows]
        for t in (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8):
            tp = sum(1 for sc, y in scores if sc >= t and y)
            fp = sum(1 for sc, y in scores if sc >= t and not y)
            tn = sum(1 for sc, y in scores if sc < t and not y)
            print(f"| {name} | {t} | {tp / pos:.3f} | {tp / max(1, tp + fp):.3f} | {(tp + tn) / len(scores):.3f} |")


def generate(kb, items, n: int, path: Path) -> None:
    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.rag.answer import Answerer, EngineGenerator
    from lmforge.serve.engine import Engine

    engine = Engine.from_folder(materialize_smollm2(), max_num_seqs=4, max_model_len=2048)
    t0 = time.time()
    try:
        answerer = Answerer(kb, EngineGenerator(engine), k=3, max_tokens=64, min_score=0.0, attribute=False)
        with open(path, "w") as f:
            for it in items[:n]:
                srcs = sources_for(kb, it.question)
                text = "".join(answerer.generator.stream(answerer.messages(it.question, srcs), 64))
                f.write(json.dumps({"id": it.id, "question": it.question, "raw": text}) + "\n")
                f.flush()
    finally:
        engine.shutdown()
    print(f"generated {n} answers in {time.time() - t0:.0f} s")


def faithful(sentence: str, item) -> bool:
    """Gold check of one answer sentence: it holds a gold answer string or a 4-word run of a gold quote."""
    low = sentence.lower()
    if any(a.lower() in low for a in item.answers):
        return True
    words = re.findall(r"\w+", low)
    for g in item.gold:
        q = " ".join(re.findall(r"\w+", g["quote"].lower()))
        if any(" ".join(words[i:i + 4]) in q for i in range(len(words) - 3)):
            return True
    return False


def score_answers(kb, items, path: Path) -> None:
    from lmforge.rag.answer import _CITE, Attributor, split_sentences

    by_id = {it.id: it for it in items}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    print(f"\n{len(rows)} SmolLM2 answers re-attributed ({path})")
    print("| attribution | cited sentences | faithful (gold check) | faithfulness | unsupported marked | answers "
          "'not found' |\n|---|---|---|---|---|---|")
    for name, make in (("old: word share ≥ 0.5, model citations kept", lambda s: Attributor(s, 0.5, verify=False)),
                       ("new: support_score, verified", lambda s: Attributor(s))):
        cited = ok = marked = not_found = 0
        for r in rows:
            item = by_id[r["id"]]
            if not item.gold:
                continue
            srcs = sources_for(kb, item.question)
            att = make(srcs)
            text = att.feed(r["raw"]) + att.flush()
            if getattr(att, "grounded", True) is False:
                not_found += 1
                continue
            for sent in split_sentences(text):
                if _CITE.search(sent):
                    cited += 1
                    ok += faithful(_CITE.sub("", sent), item)
                if "[unsupported]" in sent:
                    marked += 1
        print(f"| {name} | {cited} | {ok} | {ok / max(1, cited):.3f} | {marked} | {not_found} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default="data/kb/docs")
    ap.add_argument("--qa", default="data/kb/qa.jsonl")
    ap.add_argument("--index", required=True, help="index folder (built here if missing)")
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--answers", default=None, help="JSONL of raw SmolLM2 answers (written by --generate)")
    args = ap.parse_args()
    from lmforge.rag.index import KnowledgeBase
    from lmforge.rag.stage import Config, build_index

    if not (Path(args.index) / "CURRENT").is_file():
        build_index(Config(docs=args.docs), args.index)
    kb = KnowledgeBase.load(args.index)
    items = load_qa(args.qa)
    threshold_table(labelled_sentences(kb, items))
    if args.generate:
        generate(kb, items, args.generate, Path(args.answers))
    if args.answers and Path(args.answers).is_file():
        score_answers(kb, items, Path(args.answers))


if __name__ == "__main__":
    main()
