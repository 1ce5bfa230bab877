"""A markdown table of BFCL runs (``lmforge eval-bfcl`` output folders): accuracy per category and overall with the
95 % Wilson interval, from each run's ``items.jsonl`` (so a run stopped early is summarized over what it answered).

    python bench/bfcl_table.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.eval.bfcl import summarize


def cell(s: dict) -> str:
    return f"{round(s['accuracy'] * s['n'])}/{s['n']} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]"


def table(runs: list[Path]) -> str:
    sums = {}
    for run in runs:
        records = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines() if line.strip()]
        sums[run.name] = summarize(records) if records else {}
    cats = [c for s in sums.values() for c in s if c != "overall"]
    cats = list(dict.fromkeys(cats)) + ["overall"]
    lines = ["| run | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for name, s in sums.items():
        lines.append(f"| {name} | " + " | ".join(cell(s[c]) if c in s else "-" for c in cats) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(p) for p in sys.argv[1:]]))
