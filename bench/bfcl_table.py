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


def labels(runs: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell apart runs of the same name."""
    parts = [run.resolve().parts for run in runs]
    out = []
    for p in parts:
        k = 1
        while k < len(p) and sum(q[-k:] == p[-k:] for q in parts) > 1:
            k += 1
        out.append("/".join(p[-k:]))
    return out


def table(runs: list[Path]) -> str:
    sums = {}
    for run, label in zip(runs, labels(runs)):
        items = run / "items.jsonl"
        if not items.exists():
            raise SystemExit(f"{run}: no items.jsonl (not an `lmforge eval-bfcl` output folder)")
        records = [json.loads(line) for line in items.read_text().splitlines() if line.strip()]
        sums[label] = summarize(records) if records else {}
    cats = [c for s in sums.values() for c in s if c != "overall"]
    cats = list(dict.fromkeys(cats)) + ["overall"]
    lines = ["| run | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for name, s in sums.items():
        lines.append(f"| {name} | " + " | ".join(cell(s[c]) if c in s else "-" for c in cats) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(p) for p in sys.argv[1:]]))
