"""A 5-step agent task on the in-process engine: five model calls, each calling the calculator (tool_choice
"required"), over a conversation that grows by one call and one result per step.  Prints per step the prompt
tokens, how many of them the prefix cache already held, prefill seconds (to the first token), completion tokens and
decode seconds, then the totals and the prefill / decode shares of the model time.

    PYTHONPATH=. python bench/agent_5step.py [--model DIR (default: SmolLM2-135M-Instruct)] [--quantize int4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.agent import Agent, EngineBackend, calculator
from lmforge.serve.engine import Engine

TASK = ("Compute ((12 + 30) * 4 - 18) / 5 step by step. Use the calculator for every single operation, one at a "
        "time, and then check the final result with the calculator again.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-prefix-caching", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        from lmforge.model.pretrained import materialize_smollm2

        folder = Path.home() / ".cache" / "lmforge" / "models" / "SmolLM2-135M-Instruct"
        args.model = folder if (folder / "config.json").is_file() else materialize_smollm2(folder)
    engine = Engine.from_folder(args.model, max_num_seqs=1, max_model_len=4096, quantize=args.quantize or None,
                                enable_prefix_caching=not args.no_prefix_caching)
    try:
        agent = Agent(EngineBackend(engine, max_tokens=args.max_tokens), tools=[calculator], max_steps=5,
                      tool_choice="required")
        start = time.perf_counter()
        result = agent.run(TASK)
        wall = time.perf_counter() - start
    finally:
        engine.shutdown()
    steps = [r for r in result.trace if r["type"] == "model"]
    print(f"model {Path(args.model).name} quantize={args.quantize} prefix_caching={not args.no_prefix_caching}")
    print("step | prompt tok | cached | prefill s | completion tok | decode s | tool call")
    for r in steps:
        call = r["tool_calls"][0] if r["tool_calls"] else {}
        print(f"{r['step']:>4} | {r['prompt_tokens']:>10} | {r['cached_tokens']:>6} | {r['prefill_seconds']:>9.3f} | "
              f"{r['completion_tokens']:>14} | {r['decode_seconds']:>8.3f} | {call.get('name')}({call.get('arguments')})")
    pre = sum(r["prefill_seconds"] for r in steps)
    dec = sum(r["decode_seconds"] for r in steps)
    print(f"wall {wall:.2f} s; model {pre + dec:.2f} s = prefill {pre:.2f} s ({pre / (pre + dec):.0%}) + decode "
          f"{dec:.2f} s ({dec / (pre + dec):.0%}); tokens {result.prompt_tokens} prompt "
          f"({sum(r['cached_tokens'] for r in steps)} from the prefix cache) + {result.completion_tokens} completion")


if __name__ == "__main__":
    main()
