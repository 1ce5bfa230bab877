"""Constrained decoding (lmforge.serve.structured) on real function-calling schemas: the parameter schemas of every
BFCL function (``pip install --no-deps bfcl-eval``, Apache-2.0; only its data files are read).

Sections (all by default, or pick with ``--sections``):

* ``grammar``: per backend (xgrammar, llguidance) and vocabulary (SmolLM2-135M's 49k BPE and a 512-token lmforge BPE):
  compile time p50/p99/max over all distinct schemas (no cache), then a *random walk* through each compiled grammar
  (a random model at temperature 1: every step draws uniformly among the tokens the mask allows, half the time
  among the allowed ones that contain a closing character) timing ``fill_bitmask`` per step, and checking every
  finished walk with ``json.loads`` + ``jsonschema`` (target: 0 invalid; walks cut at ``--walk-steps`` count as
  "length").
* ``overhead``: SmolLM2-135M-Instruct int4 through the Engine, decode-step time with every row constrained vs none,
  at 1 and 16 concurrent streams (only steps whose batch has exactly that many rows count); target <= 10 %.
* ``model``: SmolLM2-135M-Instruct int4 at temperature 1 on ``--model-schemas`` BFCL schemas (0: all of them;
  ``--model-streams`` in flight), each output checked with json.loads + jsonschema; ``--model-out FILE`` appends
  every verdict to FILE and resumes from it.

    .venv/bin/python bench/structured.py [--sections grammar,overhead,model] [--limit N] [--walk-steps 256]

The machine is shared: the load average is printed with every figure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jsonschema
import numpy as np
import torch

from lmforge.serve.structured import GrammarSpec, StructuredOutputError, StructuredOutputs, make_backend
from lmforge.serve.structured.spec import normalize

# BFCL's own type names -> JSON Schema (bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI)
BFCL_TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
              "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object",
              "tuple": "array", "any": "string", "byte": "integer", "short": "integer", "long": "integer",
              "double": "number", "char": "string", "ArrayList": "array", "Array": "array", "HashMap": "object",
              "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string", "String": "string",
              "Bigint": "integer"}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def to_json_schema(node):
    """A BFCL parameter schema as JSON Schema: BFCL type names mapped (unknown -> string, as BFCL does), a
    ``default`` that contradicts its own type or enum dropped (it is an annotation)."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, val in node.items():
        if key == "type" and isinstance(val, str):
            out[key] = BFCL_TYPES.get(val, "string")
        elif key == "properties" and isinstance(val, dict):
            out[key] = {name: to_json_schema(sub) for name, sub in val.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_json_schema(val)
        else:
            out[key] = val
    if "default" in out:
        try:
            jsonschema.validate(out["default"], {k: v for k, v in out.items() if k != "default"})
        except (jsonschema.ValidationError, jsonschema.SchemaError):
            del out["default"]
    return out


def bfcl_schemas() -> list[dict]:
    """The distinct parameter schemas of every function in BFCL's v4 question files (JSON Schema form)."""
    import importlib.util

    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None:
        raise SystemExit("pip install --no-deps bfcl-eval  (Apache-2.0; only its data files are used)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    seen, out = set(), []
    for path in sorted(glob.glob(str(data / "BFCL_v4_*.json"))):
        for line in open(path):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the few files that are not JSON lines hold no function schemas
            funcs = rec.get("function") or []
            for fn in funcs if isinstance(funcs, list) else [funcs]:
                params = fn.get("parameters")
                if not isinstance(params, dict):
                    continue
                key = json.dumps(params, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    out.append(to_json_schema(params))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def tokenizers() -> dict:
    """name -> (tokenizers.Tokenizer, vocab size, eos ids)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.tokenizer.bpe import train_bpe

    smol = materialize_smollm2()
    tok = Tokenizer.from_file(str(smol / "tokenizer.json"))
    out = {"SmolLM2-49k": (tok, 49152, [2])}
    tiny_dir = Path(os.environ.get("LMFORGE_HOME", "runs")) / "bench" / "structured-bpe512"
    tiny = train_bpe(list(topics.values()), 512, tiny_dir)
    out["lmforge-bpe512"] = (tiny, tiny.get_vocab_size(), [tiny.token_to_id("<|endoftext|>")])
    return out


def closers(tok, vocab: int, eos: list[int]) -> np.ndarray:
    """Tokens that can end a JSON value or member (contain '"', '}', ']' or ',') and eos."""
    out = np.zeros(vocab, dtype=bool)
    for i in range(min(vocab, tok.get_vocab_size())):
        out[i] = any(c in tok.decode([i]) for c in '"}],')
    out[eos] = True
    return out


def random_walk(compiled, vocab: int, eos: list[int], rng: random.Random, steps: int,
                decode, closing: np.ndarray) -> tuple[str | None, list[float]]:
    """A random model: each step draws uniformly among the allowed tokens, half the time only among allowed
    "closing" tokens (so strings and arrays end and most walks finish), until the grammar terminates; returns
    (text, or None if cut at ``steps``; fill_bitmask times)."""
    m = compiled.matcher()
    bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times, out = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        m.fill_bitmask(bitmask)
        times.append(time.perf_counter() - t0)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab].view(bool)
        allowed = np.flatnonzero(bits & closing) if rng.random() < 0.5 else None
        if allowed is None or len(allowed) == 0:
            allowed = np.flatnonzero(bits)
        tok = int(allowed[rng.randrange(len(allowed))])
        assert m.accept_token(tok), tok
        if tok in eos:
            return decode(out), times
        out.append(tok)
    return None, times


def section_grammar(schemas: list[dict], walk_steps: int, walk_limit: int, backends: list[str],
                    vocabs: list[str]) -> None:
    for tok_name, (tok, vocab, eos) in tokenizers().items():
        if tok_name not in vocabs:
            continue
        for backend_name in backends:
            t0 = time.perf_counter()
            backend = make_backend(backend_name, tok, vocab, eos)
            setup = time.perf_counter() - t0
            compiled, times, rejected = [], [], {}
            for schema in schemas:
                t0 = time.perf_counter()
                try:
                    c = backend.compile(normalize(GrammarSpec.json_schema(schema)))
                    if backend_name == "llguidance":
                        c.matcher()  # llguidance builds its parser here
                except StructuredOutputError as err:
                    rejected[str(err)[:90]] = rejected.get(str(err)[:90], 0) + 1
                    continue
                times.append(time.perf_counter() - t0)
                compiled.append((schema, c))
            print(f"[grammar] {tok_name} {backend_name}: tokenizer setup {setup:.2f} s; compiled {len(times)}/"
                  f"{len(schemas)} schemas: p50 {pct(times, .5) * 1e3:.2f} ms, p99 {pct(times, .99) * 1e3:.2f} ms, "
                  f"max {max(times) * 1e3:.1f} ms (load {load()})")
            for msg, n in sorted(rejected.items(), key=lambda kv: -kv[1])[:5]:
                print(f"    rejected x{n}: {msg}")
            rng = random.Random(0)
            closing = closers(tok, vocab, eos)
            mask_times, invalid, cut, ok = [], 0, 0, 0
            for schema, c in compiled[:walk_limit]:
                text, ts = random_walk(c, vocab, eos, rng, walk_steps, tok.decode, closing)
                mask_times += ts
                if text is None:
                    cut += 1
                    continue
                try:
                    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
                    ok += 1
                except (ValueError, jsonschema.ValidationError) as err:
                    invalid += 1
                    if invalid <= 3:
                        print(f"    INVALID: {text[:120]!r}: {str(err)[:100]}")
            print(f"[grammar] {tok_name} {backend_name}: random walks over {min(walk_limit, len(compiled))} schemas: "
                  f"{ok} valid, {invalid} invalid, {cut} cut at {walk_steps} steps; fill_bitmask mean "
                  f"{statistics.mean(mask_times) * 1e6:.0f} us, p50 {pct(mask_times, .5) * 1e6:.0f} us, p99 "
                  f"{pct(mask_times, .99) * 1e6:.0f} us, max {max(mask_times) * 1e3:.1f} ms over {len(mask_times)} "
                  f"steps (load {load()})")


def chat_prompt(engine, schema: dict) -> list[int]:
    msg = ("Fill in the arguments of a function call as one JSON object matching this JSON schema:\n"
           + json.dumps(schema)[:600])
    return engine.encode_chat([{"role": "user", "content": msg}])


def timed_decode(engine) -> dict[int, list[float]]:
    """Wrap the engine's batched decode step to record its time by batch size (bench only)."""
    times: dict[int, list[float]] = {}
    orig = engine._decode

    def decode(seqs):
        t0 = time.perf_counter()
        orig(seqs)
        times.setdefault(len(seqs), []).append(time.perf_counter() - t0)

    engine._decode = decode
    return times


def run_batch(engine, jobs: list[tuple[list[int], object]]) -> list:
    """All jobs at once from threads (the engine batches them); results in order."""
    results = [None] * len(jobs)

    def run(i):
        results[i] = engine.generate_text(jobs[i][0], jobs[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def section_overhead(schemas: list[dict], tokens: int, rounds: int, backend: str, waves: int) -> None:
    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    from lmforge.serve.structured.processor import GrammarLogitsProcessor

    rng = random.Random(1)
    picked = rng.sample(schemas, 48)
    proc_time = [0.0]
    orig_call = GrammarLogitsProcessor.__call__

    def timed_call(self, output_ids, logits):  # the grammar's own cost per row (matcher + mask), bench only
        t0 = time.perf_counter()
        try:
            return orig_call(self, output_ids, logits)
        finally:
            proc_time[0] += time.perf_counter() - t0

    GrammarLogitsProcessor.__call__ = timed_call
    for streams in (1, 16):
        engine = Engine.from_folder(materialize_smollm2(), max_num_seqs=streams, max_model_len=1024, quantize="int4")
        so = StructuredOutputs.for_engine(engine, backend=backend)
        times = timed_decode(engine)
        njobs = streams * waves if streams > 1 else 2
        per: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        grammar_s, rows = 0.0, 0
        for r in range(rounds):
            for mode in ("unconstrained", "constrained") if r % 2 == 0 else ("constrained", "unconstrained"):
                jobs = []
                for i in range(njobs):
                    schema = picked[(r * njobs + i) % len(picked)]
                    procs = [so.processor(GrammarSpec.json_schema(schema))] if mode == "constrained" else []
                    jobs.append((chat_prompt(engine, schema),
                                 SamplingParams(temperature=1.0, max_tokens=tokens, seed=i, logits_processors=procs)))
                times.clear()
                proc_time[0] = 0.0
                results = run_batch(engine, jobs)
                per[mode] += times.get(streams, [])
                if mode == "constrained":
                    grammar_s += proc_time[0]
                    rows += sum(r.completion_tokens for r in results)
        u, c = statistics.median(per["unconstrained"]), statistics.median(per["constrained"])
        per_row = grammar_s / max(rows, 1)
        print(f"[overhead] SmolLM2-135M int4, {backend}, {streams} stream(s): decode step median {u * 1e3:.2f} ms "
              f"unconstrained vs {c * 1e3:.2f} ms constrained ({(c / u - 1) * 100:+.1f} %; "
              f"{len(per['unconstrained'])} / {len(per['constrained'])} steps at batch {streams}); the grammar's "
              f"own time {per_row * 1e6:.0f} us per row per step = {per_row * streams / u * 100:.1f} % of the "
              f"unconstrained step (load {load()})")
        engine.shutdown()
        so.shutdown()


def section_model(schemas: list[dict], n: int, tokens: int, backend: str, streams: int = 16,
                  out: str | None = None) -> None:
    """SmolLM2 int4 at temperature 1 on ``n`` sampled schemas (0: every schema, in order), ``streams`` requests in
    flight; with ``out`` every verdict is appended to that JSON-lines file as it comes and schemas already in it are
    skipped, so a long run can be stopped and resumed."""
    from concurrent.futures import ThreadPoolExecutor

    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    engine = Engine.from_folder(materialize_smollm2(), max_num_seqs=streams, max_model_len=1024, quantize="int4")
    so = StructuredOutputs.for_engine(engine, backend=backend)
    picked = list(enumerate(schemas)) if n == 0 else random.Random(2).sample(list(enumerate(schemas)),
                                                                              min(n, len(schemas)))
    counts = {"valid": 0, "invalid": 0, "length": 0, "refused": 0}
    if out and Path(out).exists():
        for line in open(out):
            rec = json.loads(line)
            counts[rec["verdict"]] += 1
        done = {json.loads(line)["schema"] for line in open(out)}
        picked = [(i, s) for i, s in picked if i not in done]
        print(f"[model] resuming: {sum(counts.values())} schemas already in {out}")
    lock, toks, first = threading.Lock(), [0], []
    sink = open(out, "a") if out else None

    def one(job: tuple[int, dict]) -> None:
        i, schema = job
        text, finish = "", None
        try:
            proc = so.processor(GrammarSpec.json_schema(schema))
        except StructuredOutputError as err:
            verdict, text = "refused", str(err)[:200]
        else:
            res = engine.generate_text(chat_prompt(engine, schema), SamplingParams(
                temperature=1.0, max_tokens=tokens, seed=i, logits_processors=[proc]))
            text, finish = res.text, res.finish_reason
            with lock:
                toks[0] += res.completion_tokens
            if finish == "length":
                verdict = "length"
            else:
                try:
                    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
                    verdict = "valid"
                except (ValueError, jsonschema.ValidationError) as err:
                    verdict = "invalid"
                    print(f"    INVALID schema {i} ({finish}): {text[:120]!r}: {str(err)[:100]}")
        with lock:
            counts[verdict] += 1
            first.append(text)
            if sink:
                sink.write(json.dumps({"schema": i, "verdict": verdict, "finish": finish, "text": text}) + "\n")
                sink.flush()
            if sum(counts.values()) % 100 == 0:
                print(f"    {sum(counts.values())} schemas: {counts} (load {load()})", flush=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2 * streams) as pool:  # twice the batch: the next grammars compile while rows decode
        list(pool.map(one, picked))
    wall = time.perf_counter() - t0
    print(f"[model] SmolLM2-135M int4, {backend}, temperature 1, {sum(counts.values())} BFCL schemas, {streams} "
          f"streams: {counts['valid']} valid, {counts['invalid']} invalid, {counts['length']} cut at "
          f"max_tokens={tokens}, {counts['refused']} refused (unsatisfiable); {toks[0] / wall:.1f} tok/s aggregate "
          f"this run (load {load()})")
    if first:
        print(f"    e.g. {first[0][:200]!r}")
    if sink:
        sink.close()
    engine.shutdown()
    so.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="grammar,overhead,model")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N schemas (0: all)")
    ap.add_argument("--walk-steps", type=int, default=256)
    ap.add_argument("--walk-limit", type=int, default=100000, help="random walks over at most this many schemas")
    ap.add_argument("--backends", default="xgrammar,llguidance", help="grammar section")
    ap.add_argument("--backend", default="llguidance", help="overhead and model sections")
    ap.add_argument("--vocabs", default="SmolLM2-49k,lmforge-bpe512")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens in the overhead section")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--waves", type=int, default=3, help="requests per slot at 16 streams (keeps the batch full)")
    ap.add_argument("--model-schemas", type=int, default=64)
    ap.add_argument("--model-tokens", type=int, default=256)
    ap.add_argument("--model-streams", type=int, default=16)
    ap.add_argument("--model-out", default=None, help="model section: append verdicts here; resume from it")
    args = ap.parse_args()
    schemas = bfcl_schemas()
    if args.limit:
        schemas = schemas[:args.limit]
    print(f"{len(schemas)} distinct BFCL parameter schemas; torch threads {torch.get_num_threads()}; load {load()}")
    sections = args.sections.split(",")
    if "grammar" in sections:
        section_grammar(schemas, args.walk_steps, args.walk_limit, args.backends.split(","), args.vocabs.split(","))
    if "overhead" in sections:
        section_overhead(schemas, args.tokens, args.rounds, args.backend, args.waves)
    if "model" in sections:
        section_model(schemas, args.model_schemas, args.model_tokens, args.backend, args.model_streams,
                      args.model_out)


if __name__ == "__main__":
    main()
