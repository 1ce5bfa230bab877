"""MinHash-LSH near-dedup: speed and precision / recall on planted near-duplicates, lmforge vs datasketch.

Documents: the Python and Django documentation pages (Debian packages python3.11-doc, python-django-doc), main text
extracted with resiliparse, cut into documents of 12 paragraphs, only those with at least 150 words.  For each base
document we plant two edited copies: a light one (about 1 word in 40 replaced, deleted or inserted: Jaccard of 5-gram
shingles ≈ 0.85) and a heavy one (1 in 6: Jaccard ≈ 0.3).  Truth: a pair is a near-duplicate when the exact Jaccard
similarity of its word-5-gram sets (lower-cased, punctuation removed) is ≥ 0.8.  Both systems use 5-gram shingles and
14 bands × 8 rows (datatrove's defaults).

* recall: true near-duplicate pairs inside each family (base + copies) that a system puts together;
* precision: the pairs a system puts together (any two documents, across families too) whose exact Jaccard ≥ 0.8.

datatrove's own MinHash pipeline (its four steps: signatures → buckets → clusters → filter, run in-process with
its defaults: spaCy word tokenizer, 5-grams, 14 × 8, 64-bit hashes) runs on the same texts; its clusters give its
pairs.  datasketch and datatrove are not dependencies of lmforge; they run in another venv (the one the filter
benchmark uses)::

    /tmp/dtvenv/bin/pip install datasketch "datatrove[processing]"
    .venv/bin/python bench/data_minhash_bench.py --other-python /tmp/dtvenv/bin/python

Speeds are CPU seconds of one process (docs/s/core), signatures to clusters, not counting reading the texts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import tempfile
import time
from itertools import combinations
from pathlib import Path

from lmforge.data.minhash import MinHashParams, near_duplicate_pairs

DATASKETCH_SCRIPT = r"""
import json, re, sys, time
from datasketch import MinHash, MinHashLSH
texts = json.load(open(sys.argv[1]))
punct = re.compile(r"[^\w\s]+")
t0 = time.process_time()
lsh = MinHashLSH(num_perm=112, params=(14, 8))
sigs = []
for i, t in enumerate(texts):
    w = punct.sub(" ", t.lower()).split()
    m = MinHash(num_perm=112, seed=1)
    m.update_batch([" ".join(w[k:k + 5]).encode() for k in range(max(1, len(w) - 4))])
    lsh.insert(str(i), m)
    sigs.append(m)
pairs = set()
for i, m in enumerate(sigs):
    for j in lsh.query(m):
        j = int(j)
        if j != i:
            pairs.add((min(i, j), max(i, j)))
cpu = time.process_time() - t0
json.dump({"cpu_seconds": cpu, "pairs": sorted(pairs)}, open(sys.argv[2], "w"))
"""

DATATROVE_SCRIPT = r"""
import json, logging, os, sys, tempfile, time
os.environ["TQDM_DISABLE"] = "1"
from pathlib import Path
from loguru import logger
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.utils.hashing import HashConfig
logger.remove()
texts = json.load(open(sys.argv[1]))
cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64, hash_fc="xxhash"))
docs = lambda: (Document(text=t, id=str(i)) for i, t in enumerate(texts))
with tempfile.TemporaryDirectory() as tmp:
    signature = MinhashDedupSignature(f"{tmp}/sigs", config=cfg)
    signature.word_tokenizer.word_tokenize("Load the spaCy tokenizer before the clock starts.")
    t0 = time.process_time()
    signature.run(docs(), 0, 1)
    for rank in range(cfg.num_buckets):
        MinhashDedupBuckets(f"{tmp}/sigs", f"{tmp}/buckets", config=cfg).run(None, rank, cfg.num_buckets)
    cluster = MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/remove", config=cfg, save_cluster_id=True)
    cluster.run(None, 0, 1)
    kept = sum(1 for _ in MinhashDedupFilter(f"{tmp}/remove", load_cluster_ids=True).run(docs(), 0, 1))
    cpu = time.process_time() - t0
    clusters = {}
    raw = Path(f"{tmp}/remove/000000.clusters").read_bytes() if Path(f"{tmp}/remove/000000.clusters").exists() else b""
    import struct
    for doc, cid in struct.iter_unpack("<II", raw):
        clusters.setdefault(cid, []).append(doc)
pairs = sorted({(min(a, b), max(a, b)) for m in clusters.values() for a in m for b in m if a != b})
json.dump({"cpu_seconds": cpu, "pairs": pairs, "kept": kept}, open(sys.argv[2], "w"))
"""

_PUNCT = re.compile(r"[^\w\s]+")


def shingles(text: str, n: int = 5) -> set[str]:
    w = _PUNCT.sub(" ", text.lower()).split()
    return {" ".join(w[k : k + n]) for k in range(max(1, len(w) - n + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def edit(words: list[str], every: int, rng: random.Random) -> str:
    w = list(words)
    for _ in range(max(1, len(w) // every)):
        i = rng.randrange(len(w))
        op = rng.random()
        if op < 0.4:
            w[i] = rng.choice(words)
        elif op < 0.7:
            del w[i]
        else:
            w.insert(i, rng.choice(words))
    return " ".join(w)


def planted(n_base: int, seed: int = 0) -> tuple[list[str], list[int]]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from data_bench import build_docs

    rng = random.Random(seed)
    bases = [d["text"] for d in build_docs(paras_per_doc=12) if len(d["text"].split()) >= 150]
    rng.shuffle(bases)
    texts, family = [], []
    for f, base in enumerate(bases[:n_base]):
        words = base.split()
        texts += [base, edit(words, 40, rng), edit(words, 6, rng)]
        family += [f, f, f]
    return texts, family


def score(pairs: set[tuple[int, int]], truth: set[tuple[int, int]], sh: list[set[str]]) -> tuple[float, float]:
    good = sum(1 for i, j in pairs if jaccard(sh[i], sh[j]) >= 0.8)
    return (good / len(pairs) if pairs else 1.0), (len(pairs & truth) / len(truth) if truth else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bases", type=int, default=1500, help="base documents (3 documents each)")
    ap.add_argument("--other-python", default="/tmp/dtvenv/bin/python", help="a python with datasketch installed")
    args = ap.parse_args()
    texts, family = planted(args.bases)
    sh = [shingles(t) for t in texts]
    truth = set()
    for f in set(family):
        members = [i for i, g in enumerate(family) if g == f]
        truth |= {(i, j) for i, j in combinations(members, 2) if jaccard(sh[i], sh[j]) >= 0.8}
    print(f"{len(texts):,} documents ({args.bases:,} bases + 2 edited copies each), {len(truth):,} true near-duplicate "
          f"pairs (Jaccard >= 0.8)")

    t0 = time.process_time()
    ours = near_duplicate_pairs(texts, MinHashParams(5, 14, 8))
    our_cpu = time.process_time() - t0
    p, r = score(ours, truth, sh)
    print(f"lmforge:    {len(texts) / our_cpu:8,.0f} docs/s/core  precision {p:.3f}  recall {r:.3f}  "
          f"({len(ours):,} pairs)")

    for name, code in (("datasketch", DATASKETCH_SCRIPT), ("datatrove", DATATROVE_SCRIPT)):
        with tempfile.TemporaryDirectory() as tmp:
            src, res, script = Path(tmp) / "texts.json", Path(tmp) / "res.json", Path(tmp) / "other.py"
            src.write_text(json.dumps(texts))
            script.write_text(code)
            subprocess.run([args.other_python, str(script), str(src), str(res)], check=True)
            other = json.loads(res.read_text())
        theirs = {tuple(x) for x in other["pairs"]}
        p, r = score(theirs, truth, sh)
        print(f"{name + ':':11} {len(texts) / other['cpu_seconds']:8,.0f} docs/s/core  precision {p:.3f}  "
              f"recall {r:.3f}  ({len(theirs):,} pairs)")


if __name__ == "__main__":
    main()
