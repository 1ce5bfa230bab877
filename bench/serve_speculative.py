"""Speculative decoding and chunked prefill on SmolLM2-135M-Instruct, in one run:

1. **Prompt lookup on RAG answers**: every question of the bundled knowledge-base QA set (data/kb/qa.jsonl) is turned
   into the RAG chat prompt lmforge's answerer sends (persona, instructions, the top-3 hybrid-retrieved sources from
   data/kb/docs, the question); each is answered greedily, one stream at a time, by our engine without and with
   prompt-lookup speculation (``--k`` drafts per step).  Printed: decode tokens/s of each, the speed-up, acceptance
   rate, tokens per target forward pass, and whether every answer is token-for-token identical.
2. **TTFT of a 1,000-token prompt** (knowledge-base chunks, tokenised and cut at 1,000 tokens), prefix caching off,
   best of ``--repeat``: one-pass prefill and chunked (``--chunk``); with llama-cpp-python installed, llama.cpp's
   TTFT on the f32 / q8_0 / q4_0 GGUF of the same model beside ours at float32 / int8 / int4 (the same threads).

    .venv/bin/python bench/serve_speculative.py [--k 4] [--max-tokens 128] [--quantize int4] [--threads 1]
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


def llama_cpp_ttft(folder: Path, ids: list[int], work: Path, threads: int, repeat: int) -> dict[str, float]:
    import llama_cpp

    from lmforge.export import export_gguf

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for d in ("f32", "q8_0", "q4_0"):
        path = work / f"smollm2-{d}.gguf"
        if not path.exists():
            export_gguf(folder, path, d)
        cache = dict(type_k=0, type_v=0) if d == "f32" else {}  # f32 KV cache for the f32 reference
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False,
                              **cache)
        times = []
        for _ in range(repeat + 1):  # the first run warms up
            llm.reset()
            t0 = time.perf_counter()
            next(iter(llm.generate(ids, temp=0.0, top_k=1, reset=True)))
            times.append(time.perf_counter() - t0)
        out[d] = min(times[1:])
        del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--questions", type=int, default=0, help="first N QA items (0: all)")
    ap.add_argument("--quantize", default=None, help="int8 | int4 (default: float32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512)
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
        plain, spec = engine(), engine(speculative=SpeculativeConfig("ngram", num_draft_tokens=args.k))
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
              f"≤{args.max_tokens} tokens, {dtype}{' ' + args.quantize if args.quantize else ''}, k={args.k}")
        print("| engine | decode tok/s | tokens | acceptance | tokens / forward | identical answers |")
        print("|---|---|---|---|---|---|")
        print(f"| lmforge | {tok['plain'] / sec['plain']:.1f} | {tok['plain']} | – | 1 | – |")
        print(f"| lmforge + prompt lookup | {tok['spec'] / sec['spec']:.1f} | {tok['spec']} | "
              f"{accepted / max(drafted, 1):.2f} | {tok['spec'] / max(steps, 1):.2f} | {same}/{len(prompts)} |")
        print(f"speed-up (decode tok/s): {sec['plain'] / sec['spec'] * tok['spec'] / tok['plain']:.2f}x overall; "
              f"per answer median {statistics.median(per_q):.2f}x, min {min(per_q):.2f}x, max {max(per_q):.2f}x")
        plain.shutdown()
        spec.shutdown()

    if args.skip_ttft:
        print(f"\nload after: {load()}")
        return
    text = "\n\n".join(c.text for c in kb.chunks[:60])  # the knowledge base's own text
    ids = probe.encode(text, add_special_tokens=False)[:args.ttft_tokens]
    print(f"\n## TTFT of a {len(ids)}-token prompt (best of {args.repeat}, prefix caching off, {args.threads} "
          f"thread(s))")
    print("| engine | TTFT ms |\n|---|---|")
    ours = {}
    for name, dt, q in (("float32", "float32", None), ("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4")):
        for chunk in (None, args.chunk):
            e = Engine(base, probe.tokenizer, probe.tokenizer_config, max_num_seqs=1, max_model_len=2048,
                       generation_config={}, dtype=dt, quantize=q, enable_prefix_caching=False,
                       prefill_chunk_size=chunk)
            ttft(e, ids[:64], 1)  # warm-up
            ours[(name, chunk)] = ttft(e, ids, args.repeat)
            e.shutdown()
            print(f"| lmforge {name}, {'one pass' if chunk is None else f'chunks of {chunk}'} | "
                  f"{ours[(name, chunk)] * 1000:.0f} |")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("(llama-cpp-python is not installed: no llama.cpp column)")
    else:
        for d, s in llama_cpp_ttft(folder, ids, Path(args.gguf_work), args.threads, args.repeat).items():
            print(f"| llama.cpp {d} (n_batch 512) | {s * 1000:.0f} |")
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
