"""Gemma 3 270M's single-stream decode step through the serving runner: where the time goes, and before vs after.

Prints (1) a ``torch.profiler`` table of one decode step per precision (fp32 / int8 / int4) at a given position,
(2) the thread's CPU ms per decode step, interleaved rounds (best of N), for this checkout's runner and, with
``--baseline REV``, for ``lmforge/serve/runner.py`` as it was at git revision REV (loaded side by side in the same
process), plus whether both give the same greedy tokens, and (3) with ``--llama-cpp``, llama.cpp's decode on the same
GGUF in the same run (wall ms per token; llama.cpp runs its own threads, so CPU time is not comparable).

    LMFORGE_HOME=/tmp/bench/home python bench/gemma3_decode_profile.py --pos 600 --baseline HEAD~1 --llama-cpp
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def runner_module(rev: str | None):
    """``lmforge.serve.runner`` of this checkout, or the file as it was at git revision ``rev``."""
    if rev is None:
        import lmforge.serve.runner as mod

        return mod
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:lmforge/serve/runner.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"runner_{rev.replace('~', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def prefill(runner, ids: list[int], max_len: int):
    cache = runner.allocate_cache(1, max_len)
    x = torch.tensor([ids])
    logits = runner.forward(x, torch.arange(len(ids))[None], cache, torch.tensor([0]))
    return cache, int(logits[0].argmax())


def decode(runner, cache, tok: int, pos: int, n: int) -> tuple[list[int], float]:
    """n greedy steps from position ``pos``; returns the tokens and the thread's CPU seconds per step."""
    out = []
    t = time.thread_time()
    for i in range(n):
        logits = runner.forward(torch.tensor([[tok]]), torch.tensor([[pos + i]]), cache, torch.tensor([0]))
        tok = int(logits[0].argmax())
        out.append(tok)
    return out, (time.thread_time() - t) / n


def attention_ops(positions: list[int], reps: int = 200, rounds: int = 5) -> None:
    """What the change touches, alone and light enough for a crowded machine (no model): one sliding layer's decode
    attention of Gemma 3 270M (4 query heads, 1 kv head, head_dim 256, window 512, float32) as before (all S cached
    keys, a boolean band mask built per step) and after (a view of the last 512 keys, no mask); thread CPU us per
    call, best of interleaved rounds."""
    import torch.nn.functional as F

    W, hd = 512, 256
    for S in positions:
        q = torch.randn(1, 4, 1, hd)
        ck, cv = torch.randn(1, 1, S + 8, hd), torch.randn(1, 1, S + 8, hd)

        def before():
            band = (torch.arange(S) > S - 1 - W)[None, None, None]
            return F.scaled_dot_product_attention(q, ck[:, :, :S], cv[:, :, :S], attn_mask=band, scale=hd ** -0.5,
                                                  enable_gqa=True)

        def after():
            lo = max(S - W, 0)
            return F.scaled_dot_product_attention(q, ck[:, :, lo:S], cv[:, :, lo:S], scale=hd ** -0.5, enable_gqa=True)

        torch.testing.assert_close(before(), after(), rtol=1e-5, atol=1e-6)
        best = {"before": float("inf"), "after": float("inf")}
        for _ in range(rounds):
            for name, fn in (("before", before), ("after", after)):
                t = time.thread_time()
                for _ in range(reps):
                    fn()
                best[name] = min(best[name], (time.thread_time() - t) / reps)
        print(f"sliding-layer attention, {S} cached positions: before {best['before'] * 1e6:.0f} us, after "
              f"{best['after'] * 1e6:.0f} us per call (x15 sliding layers per step: {15 * (best['before'] - best['after']) * 1e3:.2f} ms saved); "
              f"load {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention-ops", action="store_true", help="only the sliding-layer attention, before vs after")
    ap.add_argument("--folder", help="model folder (default: the packaged Gemma 3 270M, converted once)")
    ap.add_argument("--pos", type=int, default=600, help="prompt length before the timed steps")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--baseline", help="git revision whose runner.py to time side by side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    ap.add_argument("--llama-cpp", action="store_true", help="llama.cpp on the same GGUF, same prompt, same run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention_ops:
        return attention_ops([64, 256, 600, 2048])
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    from lmforge.model.hf import load_model
    from lmforge.model.pretrained import gemma3_270m_gguf_path, materialize_gguf

    folder = Path(args.folder) if args.folder else materialize_gguf(gemma3_270m_gguf_path())
    model = load_model(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = [model.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids[:args.pos - 1]
    max_len = args.pos + args.steps * (args.rounds + 2) + 8
    print(f"{folder.name}: prompt {len(ids)} tokens, sliding window {model.config.sliding_window}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    mods = {"this": runner_module(None)}
    if args.baseline:
        mods[args.baseline] = runner_module(args.baseline)
    for prec in args.precisions.split(","):
        q = None if prec == "fp32" else prec
        runners = {name: m.ModelRunner(model, "float32", q) for name, m in mods.items()}
        states, prefill_s = {}, {}
        for name, r in runners.items():
            t = time.thread_time()
            states[name] = prefill(r, ids, max_len)
            prefill_s[name] = time.thread_time() - t
        print(f"{prec}: CPU ms to prefill the {len(ids)}-token prompt (one pass): "
              + ", ".join(f"{name} {v * 1e3:.0f}" for name, v in prefill_s.items()))
        best = {name: float("inf") for name in runners}
        tokens = {name: [] for name in runners}
        pos = len(ids)
        for _ in range(args.rounds):  # interleaved: each round runs every variant for the same steps
            for name, r in runners.items():
                cache, last = states[name]
                got, s = decode(r, cache, tokens[name][-1] if tokens[name] else last, pos, args.steps)
                tokens[name] += got
                best[name] = min(best[name], s)
            pos += args.steps
        line = ", ".join(f"{name} {best[name] * 1e3:.1f}" for name in runners)
        same = "" if len(runners) == 1 else f"; greedy tokens equal: {len(set(map(tuple, tokens.values()))) == 1}"
        print(f"{prec}: CPU ms per decode step at position {len(ids)}+ (best of {args.rounds}x{args.steps}): "
              f"{line}{same}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            r = runners["this"]
            cache, _ = states["this"]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                decode(r, cache, tokens["this"][-1], pos, 1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    if args.llama_cpp:
        llama_cpp_decode(gemma3_270m_gguf_path(), ids, args.steps * args.rounds, args.threads)


def llama_cpp_decode(path, ids: list[int], n: int, threads: int) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python not installed: no llama.cpp column")
        return
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=threads, verbose=False)
    count, t, c = 0, 0.0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # greedy; the clock starts after the prefill
        if count == 0:
            t, c = time.perf_counter(), time.process_time()
            print(f"llama.cpp Q4_K_M: prefill of the {len(ids)}-token prompt {(t - t0) * 1e3:.0f} wall ms "
                  f"({(c - c0) * 1e3:.0f} process CPU ms, n_batch {llm.n_batch}), {threads} thread(s)")
        count += 1
        if count > n:
            break
    dt, dc = time.perf_counter() - t, time.process_time() - c
    print(f"llama.cpp Q4_K_M: {dt / n * 1e3:.1f} wall ms ({dc / n * 1e3:.1f} process CPU ms) per decode step at "
          f"position {len(ids)}+, {threads} thread(s), load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
