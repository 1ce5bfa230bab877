"""Figures of a recorded `lmforge team ... --out RUN` run of examples/teams/kb_answer.yaml: wall time, model calls,
tokens (prompt / cached / completion), prefill vs decode seconds, the final answer and whether it is cited.

Cited: the last writer answer has at least one ``[n]`` marker and every marker is the number of a passage the
analyst's ``search_knowledge_base`` calls returned (the run's trace); the reviewer's verdict is printed beside it.

    PYTHONPATH=. python bench/team_report.py runs/team
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def report(run: Path) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines() if line.strip()]
    log = json.loads((run / "log.json").read_text()) if (run / "log.json").exists() else []
    models = [r for r in trace if r["type"] == "model" and "prompt_tokens" in r]
    sources: set[int] = set()
    for r in trace:
        if r["type"] == "tool" and r.get("name") == "search_knowledge_base" and r.get("result"):
            try:
                sources |= {int(p["source"]) for p in json.loads(r["result"])}
            except (ValueError, TypeError, KeyError):
                pass
    answers = [m["content"].get("answer", "") for m in log if m["role"] == "writer"]
    answer = answers[-1] if answers else None
    markers = [int(n) for n in re.findall(r"\[(\d+)\]", answer or "")]
    verdicts = [m["content"].get("verdict") for m in log if m["role"] == "reviewer"]
    return {"stop_reason": manifest["metrics"].get("stop_reason"), "rounds": manifest["metrics"].get("rounds"),
            "wall_s": manifest.get("duration_s"), "model_calls": len(models),
            "prompt_tokens": sum(r["prompt_tokens"] for r in models),
            "cached_tokens": sum(r.get("cached_tokens") or 0 for r in models),
            "completion_tokens": sum(r["completion_tokens"] for r in models),
            "prefill_s": round(sum(r.get("prefill_seconds") or 0 for r in models), 1),
            "decode_s": round(sum(r.get("decode_seconds") or 0 for r in models), 1),
            "tool_calls": [(r.get("role"), r["name"], r.get("error") is None) for r in trace if r["type"] == "tool"],
            "search_sources": sorted(sources), "final_answer": answer, "citation_markers": markers,
            "cited": bool(markers) and set(markers) <= sources, "reviewer_verdicts": verdicts, "log": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="The --out folder of `lmforge team`.")
    rep = report(ap.parse_args().run)
    for k, v in rep.items():
        if k != "log":
            print(f"{k}: {v}")
    print("log:")
    for m in rep["log"]:
        print(f"  [round {m['round']}] {m['role']}: {json.dumps(m['content'], ensure_ascii=False)}")


if __name__ == "__main__":
    main()
