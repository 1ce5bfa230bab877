"""Filter-chain speed and agreement: lmforge's Gopher repetition + Gopher quality + C4 + FineWeb rules vs datatrove's.

Documents: every page of the Debian packages python3.11-doc and python-django-doc, main text extracted with
resiliparse and cut into documents of 4 paragraphs (real web-like text: prose, code, link lists).  Both chains run on
the same documents in this one run, one process each (docs/s = docs/s/core).  datatrove must be installed in its own
venv (it is never a dependency of lmforge)::

    python3.11 -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install datatrove spacy nltk
    .venv/bin/python bench/data_bench.py --datatrove-python /tmp/dtvenv/bin/python

Prints docs/s/core (documents per CPU-second) for each, the ratio, the keep/drop agreement and the disagreements by (ours, theirs) reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from lmforge.data.documents import Document
from lmforge.data.filters import C4Quality, FineWebQuality, GopherQuality, GopherRepetition

DOC_DIRS = ["/usr/share/doc/python3.11/html", "/usr/share/doc/python-django-doc/html"]

DATATROVE_SCRIPT = r"""
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
docs = [json.loads(x) for x in open(sys.argv[1])]
chain = [("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
         ("c4", C4QualityFilter(filter_no_terminal_punct=True)), ("fineweb", FineWebQualityFilter())]
for _, f in chain:  # warm up: load the spaCy tokenizer outside the timing
    f.filter(Document(text="Warm up the tokenizer. It loads once.", id="w"))
out = []
t0, c0 = time.perf_counter(), time.process_time()
for d in docs:
    doc = Document(text=d["text"], id=d["id"])
    verdict = "kept"
    for name, f in chain:
        r = f.filter(doc)
        ok, reason = (r, "") if isinstance(r, bool) else r
        if not ok:
            verdict = f"{name}:{reason}"
            break
    out.append(verdict)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
json.dump({"seconds": dt, "cpu_seconds": cpu, "verdicts": out}, open(sys.argv[2], "w"))
"""


def build_docs(paras_per_doc: int = 4) -> list[dict]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    docs = []
    for root in DOC_DIRS:
        for page in sorted(Path(root).rglob("*.html")):
            if "_modules" in page.parts:
                continue
            text = extract_plain_text(HTMLTree.parse(page.read_text(errors="replace")), main_content=True)
            paras = [p for p in text.split("\n\n") if p.strip()]
            for i in range(0, len(paras), paras_per_doc):
                docs.append({"id": f"{page}#{i}", "text": "\n\n".join(paras[i : i + paras_per_doc])})
    return docs


def ours(docs: list[dict], word_split: str = "spacy") -> tuple[float, float, list[str]]:
    """(wall seconds, CPU seconds, verdicts) of our chain over ``docs``."""
    chain = [("gopher_repetition", GopherRepetition(word_split=word_split)),
             ("gopher_quality", GopherQuality(word_split=word_split)),
             ("c4", C4Quality(word_split=word_split)), ("fineweb", FineWebQuality(word_split=word_split))]
    verdicts = []
    t0, c0 = time.perf_counter(), time.process_time()
    for d in docs:
        doc = Document(d["id"], d["text"], {})
        verdict = "kept"
        for name, step in chain:
            r = step.process(doc)
            if isinstance(r, str):
                verdict = f"{name}:{r}"
                break
        verdicts.append(verdict)
    return time.perf_counter() - t0, time.process_time() - c0, verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N documents (0 = all)")
    ap.add_argument("--word-split", default="spacy", choices=["spacy", "whitespace"],
                    help="our word counting: spacy (datatrove's rules, the same-rules comparison) or whitespace "
                         "(the stage default)")
    ap.add_argument("--repeat", type=int, default=3, help="time our chain this many times, report the best")
    args = ap.parse_args()
    docs = build_docs()
    if args.limit:
        docs = docs[: args.limit]
    print(f"{len(docs):,} documents, {sum(len(d['text']) for d in docs) / 1e6:.1f} M characters")
    with tempfile.TemporaryDirectory() as tmp:
        src, res = Path(tmp) / "docs.jsonl", Path(tmp) / "dt.json"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        script = Path(tmp) / "dt.py"
        script.write_text(DATATROVE_SCRIPT)
        subprocess.run([args.datatrove_python, str(script), str(src), str(res)], check=True)
        dt = json.loads(res.read_text())
    runs = [ours(docs, args.word_split) for _ in range(max(1, args.repeat))]
    our_s, our_cpu, our_v = min(runs, key=lambda r: r[1])
    print("lmforge runs (docs/s/core; the first starts with a cold word-split cache): "
          + ", ".join(f"{len(docs) / r[1]:,.0f}" for r in runs))
    print(f"word split: {args.word_split}; lmforge best of {len(runs)}; docs/s/core = documents per CPU-second of "
          f"the one process (wall-clock figures depend on what else runs on the machine)")
    n = len(docs)
    print(f"lmforge:   {n / our_cpu:8,.0f} docs/s/core ({our_cpu:.1f} CPU s, {our_s:.1f} s wall)")
    print(f"datatrove: {n / dt['cpu_seconds']:8,.0f} docs/s/core ({dt['cpu_seconds']:.1f} CPU s, "
          f"{dt['seconds']:.1f} s wall)")
    print(f"speed-up:  {dt['cpu_seconds'] / our_cpu:.1f}x per core ({dt['seconds'] / our_s:.1f}x wall)")
    agree = sum((a == "kept") == (b == "kept") for a, b in zip(our_v, dt["verdicts"]))
    print(f"keep/drop agreement: {agree / n:.2%} ({n - agree} of {n} differ); kept: lmforge "
          f"{our_v.count('kept'):,}, datatrove {dt['verdicts'].count('kept'):,}")
    diff = Counter((a, b) for a, b in zip(our_v, dt["verdicts"]) if (a == "kept") != (b == "kept"))
    for (a, b), c in diff.most_common(12):
        print(f"  {c:6,}  lmforge {a:40s} datatrove {b}")


if __name__ == "__main__":
    main()
