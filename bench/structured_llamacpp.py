"""JSON-schema-constrained decoding side by side: lmforge's engine vs llama.cpp (llama-cpp-python), one run, the same
model, prompts and BFCL parameter schemas (a seeded sample), temperature 1 (no top-k/top-p/min-p on either side), the
same ``max_tokens``, one stream each, run alternately schema by schema so both see the same machine load.

Per side: schemas refused (ours: ``StructuredOutputError``; llama.cpp: ``json_schema_to_gbnf`` raises or its GBNF
does not parse), grammar compile time p50/p99 (ours: the llguidance grammar + parser build; llama.cpp: schema → GBNF
in Python + the C grammar parse in ``llama_sampler_init_grammar``), then per output: valid (``json.loads`` +
``jsonschema`` with format checks), invalid, or cut by ``max_tokens`` (finish "length", counted apart), and tokens/s
(completion tokens over the wall time of the requests, prompt included: the same prompts on both sides).

    .venv/bin/python bench/structured_llamacpp.py [--model DIR] [--gguf FILE] [--n 200] [--max-tokens 96]

The model folder defaults to SmolLM2-135M-Instruct; the GGUF defaults to ``lmforge export gguf --dtype f32`` of it
(written beside it once), so both sides run the same float32 weights.  Exits 0 with a note where llama_cpp is not
installed.  The machine is shared: the load average is printed with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jsonschema  # noqa: E402

from structured import bfcl_schemas, load, pct  # noqa: E402  (bench/structured.py)


def messages_for(schema: dict) -> list[dict]:
    """The prompt both sides answer (bench/structured.py's chat prompt)."""
    return [{"role": "user", "content": "Fill in the arguments of a function call as one JSON object matching this "
                                        "JSON schema:\n" + json.dumps(schema)[:600]}]


def verdict(text: str, finish: str, schema: dict) -> str:
    """valid / invalid / length (cut by max_tokens: not judged)."""
    if finish == "length":
        return "length"
    try:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
        return "valid"
    except (ValueError, jsonschema.ValidationError):
        return "invalid"


class Side:
    """Running tallies of one side."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.compile_s: list[float] = []
        self.refused: dict[str, int] = {}
        self.counts = {"valid": 0, "invalid": 0, "length": 0}
        self.tokens = 0
        self.wall = 0.0
        self.examples: list[str] = []

    def refuse(self, why: str) -> None:
        key = why.splitlines()[0][:100] if why else "(no message)"
        self.refused[key] = self.refused.get(key, 0) + 1

    def record(self, text: str, finish: str, tokens: int, seconds: float, schema: dict) -> None:
        v = verdict(text, finish, schema)
        self.counts[v] += 1
        self.tokens += tokens
        self.wall += seconds
        if v == "invalid" and len(self.examples) < 3:
            self.examples.append(f"{finish}: {text[:140]!r}")

    def report(self) -> str:
        c = self.compile_s
        comp = (f"compile p50 {pct(c, .5) * 1e3:.1f} ms, p99 {pct(c, .99) * 1e3:.1f} ms" if c else "no compiles")
        n = sum(self.counts.values())
        lines = [f"[{self.name}] refused {sum(self.refused.values())}; {comp}; {n} outputs: "
                 f"{self.counts['valid']} valid, {self.counts['invalid']} invalid, {self.counts['length']} cut by "
                 f"max_tokens; {self.tokens} tokens in {self.wall:.1f} s = {self.tokens / max(self.wall, 1e-9):.2f} "
                 f"tok/s (load {load()})"]
        lines += [f"    refused x{k}: {why}" for why, k in sorted(self.refused.items(), key=lambda kv: -kv[1])[:5]]
        lines += [f"    invalid: {e}" for e in self.examples]
        return "\n".join(lines)


def export_gguf(model: Path) -> Path:
    out = model.parent / f"{model.name}-f32.gguf"
    if not out.exists():
        from lmforge.export.to_gguf import export_gguf as write

        write(model, out, dtype="f32")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--gguf", default=None, help="the same model as GGUF (default: exported f32 beside the folder)")
    ap.add_argument("--n", type=int, default=200, help="schemas sampled (seeded) from all BFCL parameter schemas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads on each side")
    ap.add_argument("--backend", default="llguidance")
    args = ap.parse_args()
    try:
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        print("llama_cpp is not installed (pip install llama-cpp-python): nothing to compare, skipped")
        return
    import torch

    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams
    from lmforge.serve.structured import GrammarSpec, StructuredOutputError, StructuredOutputs
    from lmforge.serve.structured.spec import normalize

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else materialize_smollm2()
    gguf = Path(args.gguf) if args.gguf else export_gguf(model)
    schemas = random.Random(args.seed).sample(bfcl_schemas(), args.n)
    print(f"{len(schemas)} BFCL parameter schemas (seed {args.seed}), model {model}, gguf {gguf.name}, temperature 1, "
          f"max_tokens {args.max_tokens}, {args.threads} thread(s) each (load {load()})")

    engine = Engine.from_folder(model, max_num_seqs=1, max_model_len=2048)
    so = StructuredOutputs.for_engine(engine, backend=args.backend)
    timer = so.backend  # compiled directly (no cache) to time it; the request goes through so.processor
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, seed=args.seed)
    ours, theirs = Side(f"lmforge {args.backend}"), Side("llama.cpp")
    t_all = time.perf_counter()
    for i, schema in enumerate(schemas):
        msgs = messages_for(schema)
        # -- ours: compile timed on a separate backend instance (no cache), then one request through the engine
        t0 = time.perf_counter()
        try:
            c = timer.compile(normalize(GrammarSpec.json_schema(schema)))
            if args.backend == "llguidance":
                c.matcher()
            ours.compile_s.append(time.perf_counter() - t0)
            proc = so.processor(GrammarSpec.json_schema(schema))
        except StructuredOutputError as err:
            ours.refuse(str(err))
            proc = None
        if proc is not None:
            t0 = time.perf_counter()
            res = engine.generate_text(engine.encode_chat(msgs), SamplingParams(
                temperature=1.0, max_tokens=args.max_tokens, seed=i, stop_token_ids=list(engine.chat_stop_token_ids),
                logits_processors=[proc]))
            ours.record(res.text, res.finish_reason, res.completion_tokens, time.perf_counter() - t0, schema)
        # -- llama.cpp: schema -> GBNF (Python), the C parser (a NULL sampler = refused), then the same request
        t0 = time.perf_counter()
        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
            smpl = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode(), b"root")
            ok = bool(smpl)
            if ok:
                llama_cpp.llama_sampler_free(smpl)
        except Exception as err:  # noqa: BLE001 - any converter failure is a refusal, recorded with its message
            theirs.refuse(f"{type(err).__name__}: {err}")
            ok = None
        if ok is False:
            theirs.refuse("GBNF from json_schema_to_gbnf did not parse (llama_sampler_init_grammar returned NULL)")
        if ok:
            theirs.compile_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = llm.create_chat_completion(messages=msgs, grammar=llama_cpp.LlamaGrammar.from_string(gbnf),
                                             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                             max_tokens=args.max_tokens, seed=i)
            choice = out["choices"][0]
            theirs.record(choice["message"]["content"] or "", choice["finish_reason"],
                          out["usage"]["completion_tokens"], time.perf_counter() - t0, schema)
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(schemas)} schemas, {time.perf_counter() - t_all:.0f} s (load {load()})", flush=True)
    print(ours.report())
    print(theirs.report())
    engine.shutdown()
    so.shutdown()


if __name__ == "__main__":
    main()
