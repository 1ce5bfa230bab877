"""Single-stream decode speed of SmolLM2-135M-Instruct next to llama.cpp, and how close it is to memory bandwidth.

In one run, same prompt, 128 greedy tokens (end-of-turn tokens banned so every engine makes all of them), the
process's main thread, best of ``--repeat``:

* lmforge's engine at float32, int8 (q8_0 blocks) and int4 (q4_1 blocks, int8 head) and llama.cpp (``llama-cpp-python``, where installed) on the
  f32 / q8_0 / q4_0 GGUFs that ``lmforge export gguf`` writes, side by side;
* a STREAM-style memory bandwidth of this machine, measured here with numpy copies and triads of 256 MB arrays;
* per engine, the bytes one decode step reads (weights, plus the KV cache up to the average position) and the
  fraction of the measured bandwidth that tok/s x bytes/token reaches;
* with ``--ppl``, perplexity of the serving path (``ModelRunner``, what the engine computes) on held-out text (the
  KJV Book of Ruth in data/demo; SmolLM2 never saw this copy's line layout), float32 against int8 and int4.

    .venv/bin/python bench/decode_speed.py [--tokens 128] [--repeat 3] [--ppl] [--configs float32,int8,int4]

The load average is printed before and after: on a shared machine every figure is a lower bound, and so is the
fraction of bandwidth.  CPU milliseconds per token (the process's CPU time, all threads) are printed next to tok/s:
they count work done, not time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.model.hf import load_model
from lmforge.model.pretrained import materialize_smollm2
from lmforge.serve.engine import Engine
from lmforge.serve.runner import ModelRunner
from lmforge.serve.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
F32 = 0  # GGML_TYPE_F32


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def stream_bandwidth(mb: int = 256, repeat: int = 5) -> dict[str, float]:
    """GB/s of STREAM's copy (a = b: read + write) and triad (a = b + s * c: 2 reads + 1 write), best of ``repeat``;
    numpy, one thread.  Decode reads weights without writing, so copy/triad bracket what a step can reach."""
    n = mb * 2 ** 20 // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    out = {}
    for name, fn, nbytes in (("copy", lambda: np.copyto(a, b), 16 * n),
                             ("triad", lambda: np.add(b, np.multiply(c, 3.0, out=a), out=a), 24 * n)):
        best = min(_timed(fn) for _ in range(repeat))
        out[name] = nbytes / best / 1e9
    t = torch.ones(n, dtype=torch.float64)
    out["torch sum (read only)"] = 8 * n / min(_timed(t.sum) for _ in range(repeat)) / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def runner_weight_bytes(runner: ModelRunner) -> int:
    """Bytes of the tensors one decode step reads in full: every layer's weights (and scales / biases), the final norm
    and the output head (the embedding table contributes one row)."""
    total = 0
    for L in runner.layers:
        for lin in (L.qkv, L.o, L.gate_up, L.down):
            total += _linear_bytes(lin)
        total += sum(t.numel() * t.element_size() for t in (L.ln1, L.ln2) if t is not None)
    return total + _linear_bytes(runner.lm_head) + runner.norm.numel() * runner.norm.element_size()


def _linear_bytes(lin) -> int:
    ts = [lin.weight] if lin.quantize is None or lin.kernel is None else [lin.q, lin.d, lin.m]
    return sum(t.numel() * t.element_size() for t in ts + [lin.bias] if t is not None)


def kv_bytes(cfg, positions: float, element_size: int) -> float:
    """Bytes of keys + values one decode step reads at ``positions`` cached tokens."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * positions * element_size


def engine_single(engine: Engine, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
    """(TTFT s, decode tok/s, CPU ms per decode token, tokens) for exactly ``n`` greedy tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=n, logit_bias={i: -100.0 for i in engine.chat_stop_token_ids})
    t0 = time.perf_counter()
    first = last = None
    cpu0 = 0.0
    out: list[int] = []
    for o in engine.generate(ids, params):
        now = time.perf_counter()
        if o.token_ids:
            if first is None:
                first, cpu0 = now, time.process_time()
            last = now
            out.extend(o.token_ids)
    cpu = (time.process_time() - cpu0) / (len(out) - 1) * 1000
    return first - t0, (len(out) - 1) / (last - first), cpu, out


def llama_cpp_single(llm, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
    out: list[int] = []
    t0 = time.perf_counter()
    first = last = None
    cpu0 = 0.0
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        now = time.perf_counter()
        if first is None:
            first, cpu0 = now, time.process_time()
        last = now
        out.append(tok)
        if len(out) == n:
            break
    return first - t0, (n - 1) / (last - first), (time.process_time() - cpu0) / (n - 1) * 1000, out


def best(repeat: int, fn, *args):
    runs = [fn(*args) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs), runs[0][3]


@torch.inference_mode()
def runner_perplexity(runner: ModelRunner, ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of the serving forward pass (prefill of non-overlapping windows, logits through its own head)."""
    total, count = 0.0, 0
    cache = runner.allocate_cache(1, window)
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        if chunk.numel() < 2:
            break
        x = chunk[None, :-1]
        h = runner.forward(x, torch.arange(x.shape[1])[None], cache, torch.tensor([0]), hidden=True)
        logits = runner.lm_head(h[0]).float()
        total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return float(np.exp(total / count))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", default="float32,int8,int4")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--llama-cpp-types", default="f32,q8_0,q4_0",
                    help="which GGUF types llama.cpp runs (a build that dies on one: leave it out)")
    ap.add_argument("--ppl", action="store_true", help="also measure perplexity of each lmforge config")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/gguf-bench")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when the output goes to a file
    folder = materialize_smollm2()
    threads = torch.get_num_threads()
    print(f"model: {folder}  threads: {threads}  tokens: {args.tokens}  load: {load()}")
    bw = stream_bandwidth()
    print("memory bandwidth (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    ref_bw = bw["copy"]
    probe = Engine.from_folder(folder, max_num_seqs=1, max_model_len=512)
    ids = probe.encode_chat(PROMPT)
    avg_pos = len(ids) + args.tokens / 2
    cfg = probe.model.config
    rows = []

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: lmforge only")
    if llama_cpp is not None and not args.no_llama_cpp:
        from lmforge.export import export_gguf

        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        for d in args.llama_cpp_types.split(","):
            p = work / f"smollm2-{d}.gguf"
            if not p.exists():
                export_gguf(folder, p, d)
            cache = dict(type_k=F32, type_v=F32) if d == "f32" else {}  # llama.cpp's default KV cache is f16
            llm = llama_cpp.Llama(model_path=str(p), n_ctx=512, n_threads=threads, verbose=False, **cache)
            llama_cpp_single(llm, ids, 4)  # warm-up
            ttft, tps, cpu, toks = best(args.repeat, llama_cpp_single, llm, ids, args.tokens)
            nbytes = p.stat().st_size + kv_bytes(cfg, avg_pos, 4 if d == "f32" else 2)
            rows.append((f"llama.cpp {d}", ttft, tps, cpu, toks, nbytes))
            del llm

    base = load_model(folder)
    ppl_ids = torch.tensor(probe.encode((ROOT / "data/demo/books/kjv-ruth.txt").read_text())[:args.ppl_tokens])
    ppls: dict[str, float] = {}
    for name in args.configs.split(","):
        quant = name if name in ("int8", "int4") else None
        engine = Engine(base, probe.tokenizer, probe.tokenizer_config, max_num_seqs=1, max_model_len=512,
                        generation_config={}, dtype="float32" if quant else name, quantize=quant)
        engine_single(engine, ids, 4)  # warm-up
        ttft, tps, cpu, toks = best(args.repeat, engine_single, engine, ids, args.tokens)
        r = engine.runner
        nbytes = runner_weight_bytes(r) + kv_bytes(cfg, avg_pos, engine.cache.k[0].element_size())
        label = f"lmforge {name}" + (" (int8 head)" if name == "int4" else "")
        rows.append((label, ttft, tps, cpu, toks, nbytes))
        if args.ppl:
            ppls[label] = runner_perplexity(r, ppl_ids)
        engine.shutdown()
    probe.shutdown()

    print(f"\nload after: {load()}\n")
    ref = next((r[4] for r in rows if r[0] == "lmforge float32"), rows[0][4])
    print("| engine / weights | decode tok/s | CPU ms/token | TTFT ms | MB read/token | GB/s | of copy bandwidth "
          "| greedy tokens equal to lmforge float32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ttft, tps, cpu, toks, nbytes in rows:
        same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(toks))
        gbs = nbytes * tps / 1e9
        print(f"| {name} | {tps:.1f} | {cpu:.1f} | {ttft * 1000:.0f} | {nbytes / 1e6:.0f} | {gbs:.1f} | "
              f"{gbs / ref_bw:.0%} | first {same} of {len(toks)} |")
    pairs = (("float32", "f32"), ("int8", "q8_0"), ("int4 (int8 head)", "q4_0"))
    by = {r[0]: r[2] for r in rows}
    for ours, theirs in pairs:
        a, b = by.get(f"lmforge {ours}"), by.get(f"llama.cpp {theirs}")
        if a and b:
            print(f"lmforge {ours} / llama.cpp {theirs}: {a / b:.2f}x")
    if ppls:
        base_ppl = ppls.get("lmforge float32")
        print(f"\nperplexity, serving path, {ppl_ids.numel()} tokens of KJV Ruth (windows of 512):")
        for name, p in ppls.items():
            delta = f" ({(p / base_ppl - 1) * 100:+.2f}%)" if base_ppl else ""
            print(f"  {name}: {p:.3f}{delta}")


if __name__ == "__main__":
    main()
