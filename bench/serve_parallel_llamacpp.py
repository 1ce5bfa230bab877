"""16 concurrent streams: ``lmforge serve`` over HTTP against llama.cpp's parallel decoding, at equal precision.

* **lmforge**: ``lmforge serve`` in its own process (``--max-num-seqs`` = streams, prefix caching off), driven from
  this process by the official ``openai`` client with all streams in flight at once (streaming chat completions,
  ``bench/serve_http.py``'s prompts: one system prompt, a different question each).
* **llama.cpp** (llama-cpp-python's low-level API; its high-level server serialises requests): one ``llama_context``
  with ``n_seq_max`` = streams, and the loop of llama.cpp's ``examples/parallel`` / ``llama-server -np N``: every step
  is one ``llama_batch`` with one token per decoding sequence, filled up to ``n_batch`` with prompt tokens of the
  sequences still prefilling; greedy sampling per sequence.  Same prompt token ids (our chat template), same
  ``max_tokens``, the GGUF that ``lmforge export gguf`` writes (f32 with an f32 KV cache against our float32; q8_0
  against our int8).

Both sides decode greedily with the chat's stop tokens banned (logit bias -100 / -inf), so every stream produces
exactly ``--max-tokens`` tokens on both.  Rounds alternate (lmforge, llama.cpp, lmforge, ...) so load changes hit
both alike; the best round of each is reported.  Printed per precision: aggregate generated tokens/s (all tokens over
the wall time from the first request to the last token), TTFT p50/p99, inter-token latency p50/p99 (gaps between a
stream's consecutive tokens; on the HTTP side between content chunks), the ratio, and how many streams' texts agree.

    .venv/bin/python bench/serve_parallel_llamacpp.py [--streams 16] [--max-tokens 64] [--precisions f32,q8_0]
        [--rounds 2] [--threads 2] [--kv-unified]

The load average is printed before and after every round; on a busy machine absolute figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from serve_http import level, lmforge_server, load, messages_for, pct

from lmforge.model.pretrained import materialize_smollm2

OURS = {"f32": ("float32", None), "q8_0": ("float32", "int8"), "q4_0": ("float32", "int4")}
F32 = 0  # GGML_TYPE_F32


@dataclass
class Run:
    wall: float  # first request to last token, s
    tokens: int
    ttft: list[float]  # per stream, s
    gaps: list[float]  # inter-token gaps over all streams, s
    texts: list[str]

    @property
    def tps(self) -> float:
        return self.tokens / self.wall


class LlamaParallel:
    """llama.cpp's parallel decoding of many greedy streams in one context (the examples/parallel loop)."""

    def __init__(self, gguf: Path, streams: int, max_len: int, threads: int, f32_cache: bool, kv_unified: bool,
                 n_batch: int = 512) -> None:
        import llama_cpp as L
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx = streams * max_len
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = streams
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = kv_unified
        if f32_cache:
            cp.type_k = cp.type_v = F32
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create the context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def run(self, prompts: list[list[int]], max_tokens: int, banned: set[int]) -> tuple[float, list[list[int]],
                                                                                          list[list[float]]]:
        """(wall s, tokens per stream, token times per stream in s after the start) of one greedy run."""
        L, b = self.L, self.batch
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        ban = np.array(sorted(banned), dtype=np.int64)
        done_prompt = [0] * len(prompts)  # prompt tokens in the cache
        out: list[list[int]] = [[] for _ in prompts]
        times: list[list[float]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        while any(len(o) < max_tokens for o in out):
            n = 0
            want: list[tuple[int, int]] = []  # (stream, batch index whose logits give its next token)
            for s, o in enumerate(out):  # one token per decoding stream
                if o and len(o) < max_tokens:
                    self._put(n, o[-1], len(prompts[s]) + len(o) - 1, s, True)
                    want.append((s, n))
                    n += 1
            for s, p in enumerate(prompts):  # then prompt tokens, up to n_batch
                while done_prompt[s] < len(p) and n < self.n_batch:
                    last = done_prompt[s] == len(p) - 1
                    self._put(n, p[done_prompt[s]], done_prompt[s], s, last)
                    if last:
                        want.append((s, n))
                    done_prompt[s] += 1
                    n += 1
            b.n_tokens = n
            if L.llama_decode(self.ctx, b) != 0:
                raise SystemExit("llama_decode failed (context too small?)")
            for s, i in want:
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                logits[ban] = -np.inf
                out[s].append(int(logits.argmax()))
            now = time.perf_counter() - t0
            for s, _ in want:
                times[s].append(now)
        return time.perf_counter() - t0, out, times

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq


def llama_round(lp: LlamaParallel, prompts: list[list[int]], max_tokens: int, banned: set[int], decode) -> Run:
    wall, out, times = lp.run(prompts, max_tokens, banned)
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    return Run(wall, sum(map(len, out)), [t[0] for t in times], gaps, [decode(o) for o in out])


def lmforge_round(url: str, streams: int, max_tokens: int, banned: set[int]) -> Run:
    bias = {str(t): -100 for t in sorted(banned)}
    wall, res = asyncio.run(level(url, streams, streams, max_tokens, temperature=0.0, logit_bias=bias))
    gaps = [b - a for r in res for a, b in zip(r.chunks, r.chunks[1:])]
    res.sort(key=lambda r: r.index)  # level() collects results as they finish
    return Run(wall, sum(r.tokens for r in res), [r.ttft for r in res], gaps, [r.text for r in res])


def row(name: str, r: Run) -> str:
    return (f"| {name} | {r.tokens} | {r.wall:.2f} | {r.tps:.1f} | {pct(r.ttft, .5) * 1000:.0f} / "
            f"{pct(r.ttft, .99) * 1000:.0f} | {pct(r.gaps, .5) * 1000:.0f} / {pct(r.gaps, .99) * 1000:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--precisions", default="f32,q8_0", help="comma list of f32, q8_0, q4_0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="both engines' (OMP_NUM_THREADS)")
    ap.add_argument("--kv-unified", action="store_true", help="llama.cpp: one KV buffer for all sequences")
    ap.add_argument("--gguf-work", default="/tmp/gguf-bench")
    args = ap.parse_args()

    from lmforge.export import export_gguf
    from lmforge.serve.engine import Engine

    folder = materialize_smollm2()
    probe = Engine.from_folder(folder, max_num_seqs=1, max_model_len=512)
    prompts = [probe.encode_chat(messages_for(i)) for i in range(args.streams)]
    banned = set(probe.chat_stop_token_ids)
    max_len = max(map(len, prompts)) + args.max_tokens + 8
    print(f"{args.streams} streams, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_tokens} greedy tokens each (stop tokens banned), threads {args.threads} each, "
          f"kv_unified {args.kv_unified}; load {load()}", flush=True)
    work = Path(args.gguf_work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for prec in [p for p in args.precisions.split(",") if p]:
        gguf = work / f"smollm2-{prec}.gguf"
        if not gguf.exists():
            export_gguf(folder, gguf, prec)
        dtype, quant = OURS[prec]
        lp = LlamaParallel(gguf, args.streams, max_len, args.threads, prec == "f32", args.kv_unified)
        ours: list[Run] = []
        theirs: list[Run] = []
        with lmforge_server(folder, dtype, quant, args.streams, prefix_caching=False, threads=args.threads) as url:
            lmforge_round(url, args.streams, 4, banned)  # warm-up, both
            llama_round(lp, prompts, 4, banned, probe.decode)
            for r in range(args.rounds):
                ours.append(lmforge_round(url, args.streams, args.max_tokens, banned))
                theirs.append(llama_round(lp, prompts, args.max_tokens, banned, probe.decode))
                print(f"{prec} round {r + 1}: lmforge {ours[-1].tps:.1f} tok/s, llama.cpp {theirs[-1].tps:.1f} tok/s "
                      f"(load {load()})", flush=True)
        lp.close()
        results[prec] = (max(ours, key=lambda x: x.tps), max(theirs, key=lambda x: x.tps),
                         [a.tps / b.tps for a, b in zip(ours, theirs)])
    print(f"\nload after: {load()}\n")
    print(f"| engine ({args.streams} streams, best of {args.rounds}) | tokens | wall s | aggregate tok/s "
          "| TTFT p50 / p99 ms | inter-token p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for prec, (a, b, ratios) in results.items():
        print(row(f"lmforge {' + '.join(x for x in OURS[prec] if x)} (HTTP)", a))
        print(row(f"llama.cpp {prec} (parallel batch)", b))
    print()
    for prec, (a, b, ratios) in results.items():
        same = sum(x == y for x, y in zip(a.texts, b.texts))
        print(f"{prec}: lmforge / llama.cpp aggregate tok/s = {a.tps / b.tps:.2f}x (best rounds; per round "
              f"{', '.join(f'{x:.2f}' for x in ratios)}); identical texts {same}/{args.streams}")


if __name__ == "__main__":
    main()
