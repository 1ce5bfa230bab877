"""Does ``torch.compile`` of the single-stream decode step pay off here?  SmolLM2-135M-Instruct, per precision:

* compile time of ``ModelRunner(compile=True)``'s decode graph (the first compiled step; a second process with the
  same ``TORCHINDUCTOR_CACHE_DIR`` measures the warm on-disk cache);
* the same decode steps eager and compiled, interleaved in rounds of 8 steps (positions 48 onwards), best and median
  of ``--rounds``: wall milliseconds per step and the thread's CPU milliseconds per step (the work done, which a
  shared machine inflates less than wall time); the logits of both must agree.

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor .venv/bin/python bench/decode_compile.py [--configs float32,int8,int4]

Single-threaded by default (``--threads 1``) so that CPU time is the step's whole cost.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lmforge.model.hf import load_model
from lmforge.model.pretrained import materialize_smollm2
from lmforge.serve.runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="float32,int8,int4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_model(materialize_smollm2())
    print(f"threads {args.threads}  load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name in args.configs.split(","):
        quant = name if name in ("int8", "int4") else None
        runners = {"eager": ModelRunner(base, name if not quant else "float32", quant),
                   "compiled": ModelRunner(base, name if not quant else "float32", quant, compile=True)}
        state = {}
        for tag, r in runners.items():
            cache, rows = r.allocate_cache(1, 512), torch.tensor([0])
            r.forward(torch.tensor([[1] * 48]), torch.arange(48)[None], cache, rows)
            state[tag] = [r, cache, 48]

        def step(tag: str) -> torch.Tensor:
            r, cache, pos = state[tag]
            out = r.forward(torch.tensor([[5]]), torch.tensor([[pos]]), cache, torch.tensor([0]))
            state[tag][2] = pos + 1
            return out

        t0 = time.perf_counter()
        first = step("compiled")
        compile_s = time.perf_counter() - t0
        if runners["compiled"]._compiled is None:
            print(f"{name}: compile failed (see the log line above); nothing to compare")
            continue
        ref = step("eager")
        diff = float((first - ref).abs().max())
        wall = {"eager": [], "compiled": []}
        cpu = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for tag in ("eager", "compiled"):
                w, c = time.perf_counter(), time.thread_time()
                for _ in range(8):
                    step(tag)
                cpu[tag].append((time.thread_time() - c) / 8 * 1000)
                wall[tag].append((time.perf_counter() - w) / 8 * 1000)
        print(f"{name}: first compiled step {compile_s:.1f} s; max |logit diff| vs eager {diff:.1e}; "
              f"load {os.getloadavg()[0]:.1f}")
        for tag in ("eager", "compiled"):
            cw, cc = sorted(wall[tag]), sorted(cpu[tag])
            print(f"  {tag:9s} wall best {cw[0]:.1f} / median {cw[len(cw) // 2]:.1f} ms per step;  "
                  f"CPU best {cc[0]:.1f} / median {cc[len(cc) // 2]:.1f} ms per step")


if __name__ == "__main__":
    main()
