"""Our GGUF export, run by llama.cpp itself (through ``llama-cpp-python``): the same tokens for the same text, the
same logits (f32 within 1e-3 relative), the same greedy continuation as our engine.

``llama-cpp-python`` compiles llama.cpp from source (~4 min on 2 cores, see bench/gguf_llamacpp.py for the flags), so
it is not a test dependency; these tests run where it is installed and skip elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_serve import CTX, _build_serve_model

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from lmforge.export import export_gguf  # noqa: E402
from lmforge.model.hf import load_model  # noqa: E402
from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.sampling import SamplingParams  # noqa: E402

TEXT = "The with statement is used to wrap the execution of a block with methods defined by a context manager."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llamacpp") / "tiny"
    _build_serve_model(folder)
    return folder


def _load(path, **kw):  # an f32 KV cache (llama.cpp's default f16 cache alone moves logits by ~1e-3)
    return llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_threads=2, verbose=False, type_k=0, type_v=0, **kw)


def test_llama_cpp_reads_our_gguf_with_our_tokens_and_logits(model_dir, tmp_path):
    path = export_gguf(model_dir, tmp_path / "tiny-f32.gguf", "f32")
    llm = _load(path, logits_all=True)
    engine = Engine.from_folder(model_dir, max_num_seqs=1, max_model_len=CTX)
    ids = engine.encode(TEXT)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours = load_model(model_dir)(torch.tensor([ids]))[0].double().numpy()
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert rel < 1e-4, rel
    engine.shutdown()


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_cpp_greedy_continuation_equals_our_engine(model_dir, tmp_path, dtype):
    path = export_gguf(model_dir, tmp_path / f"tiny-{dtype}.gguf", dtype)
    llm = _load(path)
    engine = Engine.from_folder(model_dir, max_num_seqs=1, max_model_len=CTX)
    ids = engine.encode(TEXT)[:12]
    ours = engine.generate_text(ids, SamplingParams(temperature=0.0, max_tokens=16)).token_ids  # may end at eos
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(tok)
        if len(theirs) == 16:
            break
    engine.shutdown()
    assert len(ours) >= 4
    if dtype == "f32":
        assert theirs[:len(ours)] == ours  # llama.cpp's raw generator does not stop at eos
    else:  # 8-bit blocks of 32: the first tokens agree, a near-tie later may flip
        assert theirs[:4] == ours[:4]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_every_family_exported_to_gguf_runs_in_llama_cpp(family, tiny_model_dir, tmp_path):
    """Issue 23: ``export gguf`` of each family (tiny random weights, the shapes of test_model_families_gguf) loads in
    llama.cpp with our logits (f32, f32 KV cache) and our greedy tokens, past Gemma's and Phi-3's sliding window."""
    from test_model_families_gguf import _model_folder

    from lmforge.model.generate import generate

    model = _model_folder(family, tiny_model_dir, tmp_path / "model").eval()
    path = export_gguf(tmp_path / "model", tmp_path / f"{family}-f32.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, type_k=0, type_v=0,
                          logits_all=True)
    ids = torch.randint(10, 500, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert rel < 1e-3, (family, rel)
    greedy = []
    for tok in llm.generate(ids[:20], temp=0.0, top_k=1, reset=True):
        greedy.append(tok)
        if len(greedy) == 12:
            break
    assert greedy == generate(model, ids[:20], 12), family
