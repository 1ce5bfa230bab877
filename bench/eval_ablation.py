"""Time the default data ablation on the bundled corpus (data/demo): the default variants (no filters, rules,
rules + dedup, FineWeb-style rules + MinHash, rules + dedup + quality classifier) x (data → tokenizer → proxy pretrain
→ eval on tasks/core).  Prints the load average, the wall time, the per-stage seconds and the table.

    .venv/bin/python bench/eval_ablation.py [OUT_DIR]      # default runs/ablation-bench (delete it to re-measure)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lmforge.eval import ablate


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/ablation-bench")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    t0 = time.time()
    report = ablate.run(ablate.Config(), out)
    total = time.time() - t0
    print(f"default ablation: {len(report['variants'])} variants in {total / 60:.1f} min wall time "
          f"(load average after: {os.getloadavg()[0]:.1f})")
    if report["quality_classifier"]:
        print(f"quality classifier (held out): {report['quality_classifier']}")
    for r in report["variants"]:
        print(f"  {r['variant']:<12} " + "  ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items()))
    print(ablate.to_markdown(report["variants"]))


if __name__ == "__main__":
    main()
