"""Figures of BFCL multi-turn (`lmforge eval-bfcl --categories multi_turn_...`) and persona-suite (`lmforge persona
eval`) runs, from their items.jsonl — also while a run is still going (both write one record per entry as they go):
per category the valid share with a 95 % Wilson CI and the error types; per persona and check kind the rate with a
95 % bootstrap CI.

    PYTHONPATH=. python bench/agent_evals.py --bfcl RUN [RUN ...] --persona RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def read(run: Path) -> list[dict]:
    path = run / "items.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def bfcl(run: Path) -> None:
    from lmforge.eval.bfcl import wilson_ci

    rows = read(run)
    print(f"{run}: {len(rows)} entries")
    by_cat: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    for cat, rs in by_cat.items():
        ok = sum(r["valid"] for r in rs)
        lo, hi = wilson_ci(ok, len(rs))
        errors = collections.Counter(r["error_type"] for r in rs if not r["valid"])
        calls = sum(len(step) for r in rs for turn in r["decoded"] for step in turn)
        print(f"  {cat}: {ok}/{len(rs)} valid [{lo:.2f}, {hi:.2f}]; calls made {calls}; "
              f"tokens {sum(r['prompt_tokens'] for r in rs)} prompt / {sum(r['completion_tokens'] for r in rs)} "
              f"completion; {sum(r['seconds'] for r in rs):.0f} s; errors {dict(errors)}")


def persona(run: Path) -> None:
    from lmforge.agent.persona_eval import summarize

    rows = read(run)
    print(f"{run}: {len(rows)} probes; answered by {dict(collections.Counter(r['answered_by'] for r in rows))}")
    for who, kinds in summarize(rows).items():
        for kind, v in kinds.items():
            print(f"  {who} {kind}: {v['rate']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] n={v['n']}")
    tools = collections.Counter(t for r in rows for t in r["tools"][:1])
    print(f"  first tool the model called: {dict(tools)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bfcl", type=Path, nargs="*", default=[])
    ap.add_argument("--persona", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    for run in args.bfcl:
        bfcl(run)
    for run in args.persona:
        persona(run)


if __name__ == "__main__":
    main()
