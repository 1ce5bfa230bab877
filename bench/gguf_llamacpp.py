"""Our GGUF export of SmolLM2-135M-Instruct in llama.cpp (``llama-cpp-python``) next to our engine, in one run:

* the f32 GGUF's logits on a chat prompt against our model's (max relative difference) and greedy agreement;
* single-stream decode tokens/s and TTFT of llama.cpp (f32, q8_0, q4_0 GGUFs exported by ``lmforge export gguf``)
  and of our engine (float32, bfloat16, int8, int4 with an int8 head), same prompt, same number of greedy tokens, same
  2 threads, all on the main thread of this process, one after the other.

    # compiles llama.cpp (~4 min on 2 cores); not a project dependency.  On CPUs whose AMX the VM does not enable,
    # quantised GGUFs crash llama.cpp's AMX kernels: build without them (what docs/benchmarks.md used)
    CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF" \
        .venv/bin/pip install llama-cpp-python diskcache
    .venv/bin/python bench/gguf_llamacpp.py [--tokens 64] [--repeat 3] [--work /tmp/gguf]

The load average is printed before and after; timings on a busy machine are lower bounds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from lmforge.export import export_gguf
from lmforge.model.hf import load_model
from lmforge.model.pretrained import materialize_smollm2
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

F32 = 0  # GGML_TYPE_F32
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def llama_cpp_single(llm, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    """(TTFT s, decode tok/s, tokens) of llama.cpp's greedy generator for exactly ``n`` new tokens."""
    out: list[int] = []
    t0 = time.perf_counter()
    first = last = None
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        now = time.perf_counter()
        first = first or now
        last = now
        out.append(tok)
        if len(out) == n:
            break
    return first - t0, (n - 1) / (last - first), out


def engine_single(engine: Engine, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, logit_bias={i: -100.0 for i in engine.chat_stop_token_ids})
    t0 = time.perf_counter()
    first = last = None
    out: list[int] = []
    for o in engine.generate(ids, params):
        now = time.perf_counter()
        if o.token_ids:
            first = first or now
            last = now
            out.extend(o.token_ids)
    return first - t0, (len(out) - 1) / (last - first), out


def best(repeat: int, fn, *args) -> tuple[float, float, list[int]]:
    runs = [fn(*args) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[0][2]


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/tmp/gguf-bench")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = materialize_smollm2()
    threads = torch.get_num_threads()
    print(f"model: {folder}  threads: {threads}  llama-cpp-python {llama_cpp.__version__}  load: {load()}")
    probe = Engine.from_folder(folder, max_num_seqs=1, max_model_len=512)
    ids = probe.encode_chat(PROMPT)
    ggufs = {d: work / f"smollm2-{d}.gguf" for d in ("f32", "q8_0", "q4_0")}
    for d, p in ggufs.items():
        if not p.exists():
            export_gguf(folder, p, d)

    # logits parity of the f32 file (with an f32 KV cache: llama.cpp's default f16 cache alone costs ~1e-3)
    llm = llama_cpp.Llama(model_path=str(ggufs["f32"]), n_ctx=512, n_threads=threads, logits_all=True, verbose=False,
                          type_k=F32, type_v=F32)
    assert llm.tokenize(probe.apply_chat_template(PROMPT).encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours = load_model(folder)(torch.tensor([ids]))[0].double().numpy()
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    print(f"f32 GGUF in llama.cpp vs our model, {len(ids)} prompt positions: max |diff| / max |logit| = {rel:.2e}; "
          f"same argmax at {np.mean(theirs.argmax(-1) == ours.argmax(-1)):.0%} of positions")
    del llm

    rows = []
    ref_tokens = None
    for d, p in ggufs.items():  # llama.cpp's defaults (f16 KV cache), except an f32 cache for the f32 reference
        cache = dict(type_k=F32, type_v=F32) if d == "f32" else {}
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=512, n_threads=threads, verbose=False, **cache)
        llama_cpp_single(llm, ids, 4)  # warm-up
        ttft, tps, toks = best(args.repeat, llama_cpp_single, llm, ids, args.tokens)
        rows.append((f"llama.cpp {d}", ttft, tps, toks))
        del llm
    base = load_model(folder)
    for name, dtype, quant in (("lmforge float32", "float32", None), ("lmforge bfloat16", "bfloat16", None), ("lmforge int8", "bfloat16", "int8"),
                               ("lmforge int4 (int8 head)", "bfloat16", "int4")):
        engine = Engine(base, probe.tokenizer, probe.tokenizer_config, max_num_seqs=1, max_model_len=512,
                        generation_config={}, dtype=dtype, quantize=quant)
        engine_single(engine, ids, 4)
        ttft, tps, toks = best(args.repeat, engine_single, engine, ids, args.tokens)
        rows.append((name, ttft, tps, toks))
        engine.shutdown()
    ref_tokens = rows[0][3]
    print(f"\nload after: {load()}\n")
    print("| engine / weights | TTFT ms | decode tok/s | greedy tokens equal to llama.cpp f32 |")
    print("|---|---|---|---|")
    for name, ttft, tps, toks in rows:
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), len(toks))
        print(f"| {name} | {ttft * 1000:.0f} | {tps:.1f} | first {same} of {len(toks)} |")


if __name__ == "__main__":
    main()
