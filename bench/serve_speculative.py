"""Speculative decoding and chunked prefill on SmolLM2-135M-Instruct, in one run:

1. **Prompt lookup on RAG answers**: every question of the bundled knowledge-base QA set (data/kb/qa.jsonl) is turned
   into the RAG chat prompt lmforge's answerer sends (persona, instructions, the top-3 hybrid-retrieved sources from
   data/kb/docs, the question); each is answered greedily, one stream at a time, by our engine without and with
   prompt-lookup speculation (``--k`` drafts per step).  Printed: decode tokens/s of each, the speed-up, acceptance
   rate, tokens per target forward pass, and whether every answer is token-for-token identical.  Then what a pass
   costs: thread CPU ms of a decode pass over T = 1..9 positions (T=1 the plain single-stream step, T>1 the verify
   pass), and other draft policies (n-gram lengths, k, adaptive or fixed) replayed exactly on the same greedy answers,
   with the speed-up that cost curve predicts for each.
2. **TTFT of a 1,000-token prompt** (knowledge-base chunks, tokenised and cut at 1,000 tokens), prefix caching off,
   best of ``--repeat``: one-pass prefill and chunked (``--chunks``); with llama-cpp-python installed, llama.cpp's
   TTFT on the f32 / q8_0 / q4_0 GGUF of the same model right after ours at float32 / int8 / int4 (the same threads),
   with the load average on every row.

    .venv/bin/python bench/serve_speculative.py [--k 4] [--ngram-min 2] [--ngram-max 3] [--max-tokens 128]
        [--quantize int4] [--threads 1] [--precisions float32,int8,int4] [--chunks none,512]
        [--index /tmp/kb-index]   # reuse a built knowledge base (it is built there on the first run)

Both engines run on the main thread of this process, one after the other; the load average is printed before and
after (a busy machine makes every figure a lower bound, the ratios less so).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lmforge.model.hf import load_model
from lmforge.model.pretrained import materialize_smollm2
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.speculative import SpeculativeConfig

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def knowledge_base(index: Path, docs: Path):
    from lmforge.rag.index import KnowledgeBase
    from lmforge.rag.stage import Config, build_index

    if KnowledgeBase.live_version(index) is None:
        build_index(Config(docs=str(docs)), index)
    return KnowledgeBase.load(index)


def rag_prompts(engine: Engine, kb, qa: Path) -> list[list[int]]:
    """The chat prompt of every QA item as lmforge's RAG answerer builds it (top-3 hybrid sources)."""
    from lmforge.rag.answer import Answerer
    from lmforge.rag.evaluate import load_qa

    answerer = Answerer(kb, None, k=3)
    out = []
    for item in load_qa(qa):
        sources, _ = answerer.retrieve(item.question)
        out.append(engine.encode_chat(answerer.messages(item.question, sources)))
    return out


def answer(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[int], float, dict | None]:
    """(tokens, decode seconds after the first token, speculation figures) of one greedy answer."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out: list[int] = []
    first = last = None
    spec = None
    for o in engine.generate(ids, params):
        now = time.perf_counter()
        if o.token_ids:
            first = first or now
            last = now
            out.extend(o.token_ids)
        spec = o.speculative or spec
    return out, (last - first) if first else 0.0, spec


def ttft(engine: Engine, ids: list[int], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for o in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=1)):
            if o.token_ids:
                times.append(time.perf_counter() - t0)
                break
    return min(times)


POLICIES = [(2, 3, 4, True), (1, 3, 4, True), (3, 3, 4, True), (2, 5, 4, True), (3, 8, 4, True), (4, 8, 4, True),
            (2, 3, 2, True), (2, 3, 8, True), (3, 8, 8, True), (2, 3, 1, False), (3, 8, 2, False), (4, 8, 4, False)]


def replay(prompts: list[list[int]], answers: list[list[int]], max_tokens: int, k_max: int, ngram_min: int,
           ngram_max: int, adaptive: bool) -> dict:
    """What prompt lookup with this policy does on these greedy answers, step by step as the engine does it (the
    first token comes from the prefill; a draft is kept while it equals the answer): decode passes, tokens, drafts,
    accepted drafts, and how many passes had T positions ({T: count})."""
    from lmforge.serve.speculative import SpecStats, propose_ngram

    out = {"passes": 0, "tokens": 0, "drafted": 0, "accepted": 0, "T": {}}
    for prompt, ans in zip(prompts, answers):
        stats, i = SpecStats(k=k_max), 1
        while i < len(ans):
            left = max_tokens - i
            k = min(stats.k if adaptive else k_max, left - 1)
            d = propose_ngram(prompt + ans[:i], k, ngram_max, ngram_min) if k > 0 else []
            acc = 0
            while acc < len(d) and i + acc < len(ans) and d[acc] == ans[i + acc]:
                acc += 1
            step = min(acc + 1, len(ans) - i)
            out["passes"] += 1
            out["tokens"] += step
            out["drafted"] += len(d)
            out["accepted"] += acc
            out["T"][1 + len(d)] = out["T"].get(1 + len(d), 0) + 1
            stats.adapt(len(d), acc, k_max)
            i += step
    return out


def pass_costs(engine: Engine, ids: list[int], t_max: int, rounds: int) -> dict[int, float]:
    """Thread CPU ms of one decode pass over T = 1..t_max positions after ``ids``, best of ``rounds`` interleaved
    rounds: {"verify": T=1 the plain step (``runner.forward`` of one token, the single-stream path), T>1 the
    engine's verify pass (``_all_logits``); "batched": the same T positions through the batched ``forward`` (index
    writes, gathered keys, a [B, 1, T, S] mask) and the head, how verify passes ran before their single-stream path}."""
    runner = engine.runner
    cache = runner.allocate_cache(1, len(ids) + t_max + 1)
    row = torch.tensor([0])
    runner.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, row)
    pos = len(ids)
    engine_cache, engine.cache = engine.cache, cache

    def one(T: int, path: str) -> None:
        tok = torch.tensor([ids[-T:]])
        positions = (pos + torch.arange(T))[None]
        if T == 1:
            runner.forward(tok, positions, cache, row)
        elif path == "verify":
            engine._all_logits(tok, positions, row)
        else:
            runner.lm_head(runner.forward(tok, positions, cache, row, hidden=True)).float()

    best = {path: {T: float("inf") for T in range(1, t_max + 1)} for path in ("verify", "batched")}
    try:
        for _ in range(rounds):
            for T in range(1, t_max + 1):
                for path in best:
                    one(T, path)
                    t0 = time.thread_time()
                    for _ in range(3):
                        one(T, path)
                    best[path][T] = min(best[path][T], (time.thread_time() - t0) / 3 * 1000)
    finally:
        engine.cache = engine_cache
    best["batched"][1] = best["verify"][1] = min(best["batched"][1], best["verify"][1])  # the same plain step
    return best


def llama_cpp_ttft(folder: Path, d: str, ids: list[int], work: Path, threads: int, repeat: int) -> float:
    """Best-of-``repeat`` TTFT of llama.cpp on the ``d`` GGUF (f32 / q8_0 / q4_0) that ``lmforge export gguf`` writes."""
    import llama_cpp

    from lmforge.export import export_gguf

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"smollm2-{d}.gguf"
    if not path.exists():
        export_gguf(folder, path, d)
    cache = dict(type_k=0, type_v=0) if d == "f32" else {}  # f32 KV cache for the f32 reference
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, **cache)
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        next(iter(llm.generate(ids, temp=0.0, top_k=1, reset=True)))
        times.append(time.perf_counter() - t0)
    del llm
    return min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--ngram-min", type=int, default=SpeculativeConfig.ngram_min)
    ap.add_argument("--ngram-max", type=int, default=SpeculativeConfig.ngram_max)
    ap.add_argument("--cost-rounds", type=int, default=6, help="rounds of the verify-pass cost curve (0: skip)")
    ap.add_argument("--precisions", default="float32,int8,int4", help="TTFT: which of float32, int8, int4")
    ap.add_argument("--chunks", default="none,512", help="TTFT: prefill chunk sizes to time (none: one pass)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--questions", type=int, default=0, help="first N QA items (0: all)")
    ap.add_argument("--quantize", default=None, help="int8 | int4 (default: float32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ttft-tokens", type=int, default=1000)
    ap.add_argument("--skip-rag", action="store_true")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--index", default="/tmp/lmforge-kb-index")
    ap.add_argument("--gguf-work", default="/tmp/gguf-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = materialize_smollm2()
    print(f"model: {folder}  threads: {args.threads}  load: {load()}")
    base = load_model(folder)
    probe = Engine.from_folder(folder, max_num_seqs=1, max_model_len=2048)
    dtype = "bfloat16" if args.quantize else "float32"

    def engine(**kw) -> Engine:
        return Engine(base, probe.tokenizer, probe.tokenizer_config, max_num_seqs=1, max_model_len=2048,
                      generation_config={"eos_token_id": sorted(probe.eos_token_ids)}, dtype=dtype,
                      quantize=args.quantize, enable_prefix_caching=False, **kw)

    kb = knowledge_base(Path(args.index), ROOT / "data/kb/docs")
    if not args.skip_rag:
        prompts = rag_prompts(probe, kb, ROOT / "data/kb/qa.jsonl")
        if args.questions:
            prompts = prompts[:args.questions]
        spec_cfg = SpeculativeConfig("ngram", num_draft_tokens=args.k, ngram_max=args.ngram_max,
                                     ngram_min=args.ngram_min)
        plain, spec = engine(), engine(speculative=spec_cfg)
        answer(plain, prompts[0], 8)
        answer(spec, prompts[0], 8)  # warm-up
        rows = {"plain": [], "spec": []}
        for ids in prompts:  # alternate, so load changes hit both alike
            rows["plain"].append(answer(plain, ids, args.max_tokens))
            rows["spec"].append(answer(spec, ids, args.max_tokens))
        same = sum(a[0] == b[0] for a, b in zip(rows["plain"], rows["spec"]))
        tok = {k: sum(len(r[0]) - 1 for r in v) for k, v in rows.items()}
        sec = {k: sum(r[1] for r in v) for k, v in rows.items()}
        drafted = sum(r[2]["draft_tokens"] for r in rows["spec"])
        accepted = sum(r[2]["accepted_tokens"] for r in rows["spec"])
        steps = sum(r[2]["decode_steps"] for r in rows["spec"])
        per_q = [((len(b[0]) - 1) / b[1]) / ((len(a[0]) - 1) / a[1]) for a, b in zip(rows["plain"], rows["spec"])
                 if a[1] and b[1]]
        mean_prompt = statistics.mean(map(len, prompts))
        print(f"\n## prompt lookup on {len(prompts)} RAG prompts (mean {mean_prompt:.0f} tokens), greedy, "
              f"≤{args.max_tokens} tokens, {dtype}{' ' + args.quantize if args.quantize else ''}, k={args.k}, "
              f"n-grams {args.ngram_min}-{args.ngram_max}")
        print("| engine | decode tok/s | tokens | acceptance | tokens / forward | identical answers |")
        print("|---|---|---|---|---|---|")
        print(f"| lmforge | {tok['plain'] / sec['plain']:.1f} | {tok['plain']} | – | 1 | – |")
        print(f"| lmforge + prompt lookup | {tok['spec'] / sec['spec']:.1f} | {tok['spec']} | "
              f"{accepted / max(drafted, 1):.2f} | {tok['spec'] / max(steps, 1):.2f} | {same}/{len(prompts)} |")
        print(f"speed-up (decode tok/s): {sec['plain'] / sec['spec'] * tok['spec'] / tok['plain']:.2f}x overall; "
              f"per answer median {statistics.median(per_q):.2f}x, min {min(per_q):.2f}x, max {max(per_q):.2f}x")
        answers = [r[0] for r in rows["plain"]]
        mean_k = sum(r[2]["draft_tokens"] for r in rows["spec"]) / max(steps, 1)
        print(f"verify passes: {drafted} drafts over {steps} decode steps ({mean_k:.2f} drafts per step)")
        costs = pass_costs(plain, prompts[0], max(9, args.k + 1), args.cost_rounds) if args.cost_rounds else None
        cost = costs["verify"] if costs else None
        if costs:
            print(f"\n## CPU ms of one decode pass over T positions (one thread, best of {args.cost_rounds} interleaved "
                  f"rounds, {len(prompts[0])} cached tokens; T=1 plain: the single-stream step)")
            print("| T | " + " | ".join(map(str, cost)) + " |\n|---|" + "---|" * len(cost))
            for path, c in costs.items():
                print(f"| {path} CPU ms | " + " | ".join(f"{x:.1f}" for x in c.values()) + " |")
                print(f"| {path} × plain | " + " | ".join(f"{x / c[1]:.2f}" for x in c.values()) + " |")
        print("\n## draft policies replayed on the greedy answers above (exact: acceptance depends only on them)")
        print("| n-grams | k | adaptive | tokens / pass | acceptance | drafts / pass | predicted speed-up "
              "(verify / batched costs) |")
        print("|---|---|---|---|---|---|---|")
        for lo, hi, k, adaptive in POLICIES + [(args.ngram_min, args.ngram_max, args.k, True)]:
            r = replay(prompts, answers, args.max_tokens, k, lo, hi, adaptive)
            pred = " / ".join(f"{r['tokens'] * c[1] / sum(c[t] * n for t, n in r['T'].items()):.2f}x"
                              for c in costs.values()) if costs and max(r["T"]) <= max(cost) else "–"
            print(f"| {lo}-{hi} | {k} | {'yes' if adaptive else 'no'} | {r['tokens'] / r['passes']:.2f} | "
                  f"{r['accepted'] / max(r['drafted'], 1):.2f} | {r['drafted'] / r['passes']:.2f} | {pred} |")
        print("(the last row: the policy measured above)")
        plain.shutdown()
        spec.shutdown()

    if args.skip_ttft:
        print(f"\nload after: {load()}")
        return
    text = "\n\n".join(c.text for c in kb.chunks[:60])  # the knowledge base's own text
    ids = probe.encode(text, add_special_tokens=False)[:args.ttft_tokens]
    print(f"\n## TTFT of a {len(ids)}-token prompt (best of {args.repeat}, prefix caching off, {args.threads} "
          f"thread(s))")
    print("| engine | TTFT ms | load |\n|---|---|---|")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama_cpp = None
        print("(llama-cpp-python is not installed: no llama.cpp rows)")
    configs = {"float32": ("float32", None, "f32"), "int8": ("bfloat16", "int8", "q8_0"),
               "int4": ("bfloat16", "int4", "q4_0")}
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",") if c]
    for name in [p for p in args.precisions.split(",") if p]:  # ours, then llama.cpp at the same precision
        dt, q, gguf = configs[name]
        for chunk in chunks:
            e = Engine(base, probe.tokenizer, probe.tokenizer_config, max_num_seqs=1, max_model_len=2048,
                       generation_config={}, dtype=dt, quantize=q, enable_prefix_caching=False,
                       prefill_chunk_size=chunk)
            ttft(e, ids[:64], 1)  # warm-up
            secs = ttft(e, ids, args.repeat)
            e.shutdown()
            print(f"| lmforge {name}{' (int8 head)' if q == 'int4' else ''}, "
                  f"{'one pass' if chunk is None else f'chunks of {chunk}'} | {secs * 1000:.0f} | {load()} |", flush=True)
        if llama_cpp is not None:
            secs = llama_cpp_ttft(folder, gguf, ids, Path(args.gguf_work), args.threads, args.repeat)
            print(f"| llama.cpp {gguf} (n_batch 512) | {secs * 1000:.0f} | {load()} |", flush=True)
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
