"""The llama.cpp side of bench/serve_parallel_llamacpp.py: many greedy streams decoded in one llama.cpp context, one
token per stream per batch, must give every stream the continuation it gets alone in our engine (tiny model, f32
GGUF with an f32 KV cache).  Skips where llama-cpp-python is not installed (CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_serve import CTX, _build_serve_model

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("openai")

from lmforge.export import export_gguf  # noqa: E402
from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.sampling import SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serve_parallel_llamacpp import LlamaParallel  # noqa: E402

TEXTS = ["The with statement is used to wrap", "A generator function returns", "Exceptions are raised when",
         "The import system finds modules"]


def test_parallel_batch_gives_each_stream_its_own_greedy_continuation(tmp_path):
    folder = tmp_path / "tiny"
    _build_serve_model(folder)
    gguf = export_gguf(folder, tmp_path / "tiny-f32.gguf", "f32")
    engine = Engine.from_folder(folder, max_num_seqs=1, max_model_len=CTX)
    prompts = [engine.encode(t) for t in TEXTS]
    banned = set(engine.chat_stop_token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=6, logit_bias={t: -100.0 for t in banned})
    alone = [engine.generate_text(p, params).token_ids for p in prompts]
    engine.shutdown()
    lp = LlamaParallel(gguf, len(prompts), CTX, threads=1, f32_cache=True, kv_unified=False, n_batch=16)
    try:
        wall, out, times = lp.run(prompts, 6, banned)  # n_batch 16 < the prompts: prefill spans several batches
        again = lp.run(prompts, 6, banned)[1]  # the cache is cleared between runs
    finally:
        lp.close()
    assert [len(o) for o in out] == [6] * len(prompts)
    assert out == alone
    assert again == out
    assert all(len(t) == 6 and t == sorted(t) for t in times) and wall >= max(t[-1] for t in times)
