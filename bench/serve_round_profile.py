"""Where one 16-stream round of ``bench/serve_parallel_llamacpp.py`` spends the engine's time, in-process.

The same engine settings as that bench's server (``max_num_seqs`` = streams, prefix caching off, ``max_model_len``
512), the same prompts (``bench/serve_http.py``'s chat: one system prompt, a different question each) and the same
greedy requests (``--max-tokens`` each, the chat's stop tokens banned), all submitted at once (``generate_batch``);
timers around the engine's prefill passes, batched decode steps, the runner's forward passes, sampling and the
per-token bookkeeping (detokenize, stop checks, emit).  Printed per round: wall seconds and the main thread's CPU
seconds for each part (with one thread, CPU time is the work done, which a shared machine inflates less than wall).

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_round_profile.py [--quantize int8|int4] [--streams 16]
        [--max-tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from serve_http import messages_for

from lmforge.model.pretrained import materialize_smollm2
from lmforge.serve import engine as engine_mod
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

ORDER = ["prefill passes", "batched decode steps", "forward passes (both)", "sampling", "detokenize, stops, emit"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantize", default=None, help="int8 or int4 (default: float32 weights)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    eng = Engine.from_folder(materialize_smollm2(), max_num_seqs=args.streams, max_model_len=512,
                             quantize=args.quantize, enable_prefix_caching=False)
    prompts = [eng.encode_chat(messages_for(i)) for i in range(args.streams)]
    wall: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def timed(owner: object, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def run(*a, **k):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*a, **k)
            finally:
                wall[key] += time.perf_counter() - t
                cpu[key] += time.thread_time() - c
                calls[key] += 1

        setattr(owner, name, run)

    timed(eng, "_prefill", ORDER[0])
    timed(eng, "_decode", ORDER[1])
    timed(eng.runner, "forward", ORDER[2])
    timed(engine_mod, "sample", ORDER[3])
    timed(eng, "_append", ORDER[4])
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                            logit_bias={t: -100.0 for t in eng.chat_stop_token_ids})
    eng.generate_batch(prompts[:4], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    print(f"{args.streams} streams, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_tokens} greedy tokens each, weights {args.quantize or 'float32'}, "
          f"threads {torch.get_num_threads()}")
    for r in range(args.rounds):
        wall.clear(), cpu.clear(), calls.clear()
        t, c = time.perf_counter(), time.thread_time()
        res = eng.generate_batch(prompts, params)
        w, cp = time.perf_counter() - t, time.thread_time() - c
        tokens = sum(len(x.token_ids) for x in res)
        print(f"round {r + 1}: {tokens} tokens, {w:.2f} s wall ({tokens / w:.1f} tok/s), main thread {cp:.2f} s CPU; "
              f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for key in [k for k in ORDER if k in wall]:
            print(f"  {key:28s} {calls[key]:4d} calls  {wall[key]:7.2f} s wall  {cpu[key]:7.2f} s CPU  "
                  f"({100 * cpu[key] / cp:4.1f} % of CPU)")


if __name__ == "__main__":
    main()
