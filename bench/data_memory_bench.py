"""Peak memory of the data stage as the corpus grows: the same pipeline (HTML-extracted text → normalise → language
ID → Gopher rules → C4 → FineWeb → [corpus-wide repeated-line removal] → exact dedup → MinHash near-dedup) on 1/4 of a
corpus and on all of it.

Corpus: the Python and Django documentation pages (Debian packages python3.11-doc, python-django-doc), main text
extracted with resiliparse, 4 paragraphs per document, written as JSONL files of 1,000 documents.  Each size runs in a
fresh process (one worker) that reports its own peak RSS (``ru_maxrss``), so the figures do not mix.

    .venv/bin/python bench/data_memory_bench.py [--line-dedup]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from lmforge.data.stage import Config, run
t0 = time.time()
m = run(Config(inputs=[sys.argv[1]], shards=8, minhash=True, c4_quality=True, fineweb_quality=True,
               line_dedup=sys.argv[3] == "1"), sys.argv[2])
steps = json.load(open(sys.argv[2] + "/stats.json"))["steps"]
print(json.dumps({"docs_in": m.metrics["docs_in"], "docs_kept": m.metrics["docs_kept"], "seconds": time.time() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "us_per_doc": {s["name"]: s["us_per_doc"] for s in steps}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs-per-file", type=int, default=1000)
    ap.add_argument("--line-dedup", action="store_true", help="also remove lines repeated across the corpus")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from data_bench import build_docs

    docs = build_docs()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for frac in (4, 1):
            n = len(docs) // frac
            src = Path(tmp) / f"in{frac}"
            src.mkdir()
            for k in range(0, n, args.docs_per_file):
                with open(src / f"docs{k // args.docs_per_file:04d}.jsonl", "w") as f:
                    for d in docs[k : min(n, k + args.docs_per_file)]:
                        f.write(json.dumps(d) + "\n")
            out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"out{frac}"),
                                  "1" if args.line_dedup else "0"],
                                 check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            results.append(r)
            print(f"{r['docs_in']:>7,} documents: peak RSS {r['peak_rss_mb']:7.1f} MB, {r['docs_kept']:,} kept, "
                  f"{r['seconds']:.1f} s")
            if args.line_dedup:
                print(f"  line_dedup_v1: {r['us_per_doc'].get('line_dedup_v1')} µs/doc (hashing in the shards, "
                      f"merging, removing)")
    small, big = results
    print(f"corpus x{big['docs_in'] / small['docs_in']:.1f} → peak RSS x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
