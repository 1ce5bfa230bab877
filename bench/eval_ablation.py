"""Time the default data ablation on the bundled corpus (data/demo): 3 variants x (data → tokenizer → proxy
pretrain → eval on tasks/core).  Prints the wall time, the per-stage seconds and the table.

    .venv/bin/python bench/eval_ablation.py [OUT_DIR]      # default runs/ablation-bench (delete it to re-measure)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge.eval import ablate


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/ablation-bench")
    t0 = time.time()
    report = ablate.run(ablate.Config(), out)
    total = time.time() - t0
    print(f"default ablation: {len(report['variants'])} variants in {total / 60:.1f} min wall time")
    for r in report["variants"]:
        print(f"  {r['variant']:<12} " + "  ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items()))
    print(ablate.to_markdown(report["variants"]))


if __name__ == "__main__":
    main()
