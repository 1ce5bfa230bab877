"""The block-quantised int8/int4 kernels (``lmforge.serve.kernels``) against what they replaced, on SmolLM2-135M:

* matmuls one at a time on the model's shapes, CPU microseconds per call (best of 3 rounds): float32 ``F.linear``,
  PyTorch's per-channel int8 ``_weight_int8pack_mm`` and group-wise int4 ``_weight_int4pack_mm_for_cpu`` (bf16
  inputs, the runner's formats before), and the q8 / q4 kernels (float32 inputs quantised to int8 per block);
* with ``--before path/to/old/runner.py`` (``git archive <commit> lmforge/serve/runner.py | tar -x -C /tmp/old``), the
  whole decode step of that runner and of this one, interleaved in rounds of 8 steps (positions 48 onwards), the
  thread's CPU milliseconds per step (the work done, which a shared machine inflates less than wall time) and wall
  milliseconds, best and median of ``--rounds``; the max |logit diff| between the two;
* the fused step's matmuls (``fused_linear``: float32 / q8 / q4, each weight read once for all rows) next to them,
  and the same in the row-interleaved layout the runner stores (``x8``: 8 output rows per pass; q4 with int8
  activations);
* with ``--profile``, where one fused decode step's milliseconds go: the step (one stream at position 100) against
  its matmuls run alone over the real weights of every layer in layer order (so they stream from memory as in the
  step), per kind of matmul, thread CPU ms, best of ``--rounds``;
* with ``--fused T,...``, the fused C++ step against the Python path of the same runner (``fused=False``), one stream:
  a decode step (T = 1) and verify passes of T positions, interleaved rounds, CPU ms per call and its ratio to one
  decode step of the same path.

    .venv/bin/python bench/decode_kernels.py [--before /tmp/old/lmforge/serve/runner.py] [--threads 1] [--m 1]
                                             [--fused 1,2,5,9,16] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from lmforge.model.hf import load_model
from lmforge.model.pretrained import materialize_smollm2
from lmforge.model.quant import quantize_weight_int4, quantize_weight_int8
from lmforge.serve import kernels
from lmforge.serve.runner import ModelRunner

SHAPES = {"qkv 960 x 576": (960, 576), "o 576 x 576": (576, 576), "gate+up 3072 x 576": (3072, 576),
          "down 576 x 1536": (576, 1536), "head 49152 x 576": (49152, 576)}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_us(fn, budget: float = 0.2) -> float:
    fn()
    t0 = time.process_time()
    fn()
    n = max(2, int(budget / max(time.process_time() - t0, 1e-5)))
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def kernel_table(m: int) -> None:
    ext = kernels.load()
    print(f"\nmatmuls, {m} row(s), CPU µs per call, {torch.get_num_threads()} thread(s), load {load()}")
    print("| matmul (out x in) | float32 | int8 per-channel (bf16 in) | int4 groups (bf16 in) | q8 kernel | q4 kernel "
          "| fused float32 | fused q8 | fused q4 | x8 q8 | x8 q4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        x = torch.randn(m, k)
        xb = x.bfloat16()
        q, s = quantize_weight_int8(w)
        s = s.bfloat16()
        p4, sz = quantize_weight_int4(w, 32, torch.bfloat16)
        q8, d8 = kernels.quantize_q8(w)
        q4, d4, m4 = kernels.quantize_q4(w)
        row = [cpu_us(lambda: F.linear(x, w)), cpu_us(lambda: torch._weight_int8pack_mm(xb, q, s)),
               cpu_us(lambda: torch._weight_int4pack_mm_for_cpu(xb, p4, 32, sz))]
        if ext is not None:
            row += [cpu_us(lambda: ext.q8_matmul(x, q8, d8)), cpu_us(lambda: ext.q4_matmul(x, q4, d4, m4))]
            row += [cpu_us(lambda: ext.fused_linear(x, [w, None, None, None, None])),
                    cpu_us(lambda: ext.fused_linear(x, [None, q8, d8, None, None])),
                    cpu_us(lambda: ext.fused_linear(x, [None, q4, d4, m4, None]))]
            x8, x4 = kernels.pack_x8(q8, d8), kernels.pack_x8(q4, d4, m4)
            row += [cpu_us(lambda: ext.fused_linear(x, [None, x8[0], x8[1], None, None])),
                    cpu_us(lambda: ext.fused_linear(x, [None, *x4, None]))]
        print(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in row) + " |")


def steps(before: str, configs: list[str], rounds: int) -> None:
    spec = importlib.util.spec_from_file_location("runner_before", before)
    old = sys.modules["runner_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    base = load_model(materialize_smollm2())
    for name in configs:
        quant = name if name in ("int8", "int4") else None
        dtype = "float32" if quant else name
        runners = {"before": old.ModelRunner(base, dtype, quant), "now": ModelRunner(base, dtype, quant)}
        state = {}
        for tag, r in runners.items():
            cache = r.allocate_cache(1, 512)
            r.forward(torch.tensor([[1] * 48]), torch.arange(48)[None], cache, torch.tensor([0]))
            state[tag] = [r, cache, 48]

        def step(tag: str) -> torch.Tensor:
            r, cache, pos = state[tag]
            out = r.forward(torch.tensor([[5]]), torch.tensor([[pos]]), cache, torch.tensor([0]))
            state[tag][2] = pos + 1
            return out

        diff = float((step("before") - step("now")).abs().max())
        wall: dict[str, list[float]] = {"before": [], "now": []}
        cpu: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(rounds):
            for tag in ("before", "now"):
                w, c = time.perf_counter(), time.thread_time() if torch.get_num_threads() == 1 else time.process_time()
                for _ in range(8):
                    step(tag)
                c1 = time.thread_time() if torch.get_num_threads() == 1 else time.process_time()
                cpu[tag].append((c1 - c) / 8 * 1000)
                wall[tag].append((time.perf_counter() - w) / 8 * 1000)
        print(f"\n{name}: max |logit diff| before vs now {diff:.2f}; load {load()}")
        for tag in ("before", "now"):
            cw, cc = sorted(wall[tag]), sorted(cpu[tag])
            print(f"  {tag:7s} CPU best {cc[0]:.1f} / median {cc[len(cc) // 2]:.1f} ms per step;  "
                  f"wall best {cw[0]:.1f} / median {cw[len(cw) // 2]:.1f}")


def fused_vs_python(configs: list[str], ts: list[int], rounds: int) -> None:
    """CPU ms per call of the fused step and the Python path, one stream at position ~100, interleaved rounds."""
    base = load_model(materialize_smollm2())
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    for name in configs:
        quant = name if name in ("int8", "int4") else None
        runners = {"fused": ModelRunner(base, "float32", quant), "python": ModelRunner(base, "float32", quant,
                                                                                          fused=False)}
        caches = {}
        for tag, r in runners.items():
            caches[tag] = r.allocate_cache(1, 512)
            r.forward(torch.arange(100)[None] + 200, torch.arange(100)[None], caches[tag], torch.tensor([0]))
        cpu: dict[tuple[str, int], list[float]] = {(tag, t): [] for tag in runners for t in ts}
        for _ in range(rounds):
            for t in ts:
                for tag, r in runners.items():
                    ids = torch.arange(t)[None] + 300
                    c0 = clock()
                    for _ in range(4):
                        if t == 1:
                            r.forward(ids, torch.tensor([[100]]), caches[tag], torch.tensor([0]))
                        else:
                            r.verify_logits(ids, 100, caches[tag], 0)
                    cpu[(tag, t)].append((clock() - c0) / 4 * 1000)
        print(f"\n{name}: CPU ms per call (best of {rounds} rounds of 4), load {load()}")
        print("| positions T | fused | Python | fused / Python | fused T / fused 1 | Python T / Python 1 |")
        print("|---|---|---|---|---|---|")
        best = {k: min(v) for k, v in cpu.items()}
        for t in ts:
            f, p = best[("fused", t)], best[("python", t)]
            f1, p1 = best.get(("fused", 1), float("nan")), best.get(("python", 1), float("nan"))
            print(f"| {t} | {f:.2f} | {p:.2f} | {f / p:.2f} | {f / f1:.2f} | {p / p1:.2f} |")


def step_profile(configs: list[str], rounds: int) -> None:
    """The fused step's thread CPU ms per decode step against its matmuls alone, per matmul kind (all layers)."""
    base = load_model(materialize_smollm2())
    ext = kernels.load()
    print(f"\nfused decode step vs its matmuls alone, thread CPU ms per step, best of {rounds}")
    print("| weights | step | all matmuls | qkv (all layers) | o | gate+up | down | head | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in configs:
        quant = name if name in ("int8", "int4") else None
        r = ModelRunner(base, "float32", quant)
        cache = r.allocate_cache(1, 512)
        r.forward(torch.arange(100)[None] + 200, torch.arange(100)[None], cache, torch.tensor([0]))

        def lin(m) -> list:
            return [m.weight if m.q is None else None, m.q, m.d, m.m, m.bias]

        cfg = r.config
        xs = {"qkv": cfg.hidden_size, "o": cfg.num_attention_heads * cfg.head_dim, "gate_up": cfg.hidden_size,
              "down": cfg.intermediate_size}
        xs = {k: torch.randn(1, v) for k, v in xs.items()}
        res: dict[str, list[float]] = {k: [] for k in ["step", "all", *xs, "head"]}
        for _ in range(rounds):
            c = time.thread_time()
            for _ in range(4):
                r.forward(torch.tensor([[300]]), torch.tensor([[100]]), cache, torch.tensor([0]))
            res["step"].append((time.thread_time() - c) / 4 * 1e3)
            total = 0.0
            for k, x in xs.items():
                c = time.thread_time()
                for L in r.layers:
                    ext.fused_linear(x, lin(getattr(L, k)))
                res[k].append((time.thread_time() - c) * 1e3)
                total += res[k][-1]
            c = time.thread_time()
            ext.fused_linear(xs["qkv"], lin(r.lm_head))
            res["head"].append((time.thread_time() - c) * 1e3)
            res["all"].append(total + res["head"][-1])
        print(f"| {name} | " + " | ".join(f"{min(v):.2f}" for v in res.values()) + f" | {load()} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="an earlier runner.py to compare whole decode steps with")
    ap.add_argument("--configs", default="float32,int8,int4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--m", default="1", help="rows per matmul, comma-separated (0: skip the kernel table)")
    ap.add_argument("--fused", default="", help="positions per call to time the fused step against the Python "
                    "path at, comma-separated (1: a decode step; more: verify passes), e.g. 1,2,5,9,16")
    ap.add_argument("--profile", action="store_true", help="where the fused decode step's time goes (1 thread)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}  load {load()}")
    for m in (int(v) for v in args.m.split(",")):
        if m:
            kernel_table(m)
    if args.before:
        steps(args.before, args.configs.split(","), args.rounds)
    if args.profile:
        step_profile(args.configs.split(","), args.rounds)
    if args.fused:
        fused_vs_python(args.configs.split(","), [int(v) for v in args.fused.split(",")], args.rounds)


if __name__ == "__main__":
    main()
