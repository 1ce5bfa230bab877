"""Agent loop overhead per step, model time excluded: a scripted model (no inference) asks for one calculator call
per step (and, with --parallel N, N calls at once), the loop validates, runs the calls on threads and appends the
messages.  Prints the median and p90 wall time per step over many runs.

    PYTHONPATH=. python bench/agent_overhead.py [--steps 5] [--runs 200] [--parallel 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

from lmforge.agent import Agent, ScriptedModel, calculator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()
    turn = [("calculator", {"expression": f"({i} + 3) * 7 / 2"}) for i in range(args.parallel)]
    per_step: list[float] = []
    for _ in range(args.runs):
        agent = Agent(ScriptedModel([turn] * args.steps + ["done"]), tools=[calculator], max_steps=args.steps + 1)
        start = time.perf_counter()
        result = agent.run("compute")
        per_step.append((time.perf_counter() - start) / result.steps)
        assert result.stop_reason == "answer"
    per_step.sort()
    print(f"agent overhead per step ({args.steps} tool steps + answer, {args.parallel} call(s) per step, "
          f"{args.runs} runs): median {statistics.median(per_step) * 1e3:.3f} ms, "
          f"p90 {per_step[int(0.9 * len(per_step))] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
