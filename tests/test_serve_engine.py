"""The serving hot path: ModelRunner parity with the reference model (float32 exact, bf16 / int8 / int4 close),
batched padded prefill, int8 and int4 weight-only quantisation, and the sampler's top-k / min-p / repetition penalty /
logprobs."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_serve import CTX, _build_serve_model

from lmforge.model.hf import load_model
from lmforge.model.quant import (Int4Linear, Int8Linear, int4_linear, perplexity, quantize_llama_int4,
                                 quantize_llama_int8, quantize_weight_int4, quantize_weight_int8)
from lmforge.serve.engine import Engine
from lmforge.serve.runner import ModelRunner
from lmforge.serve.sampling import SamplerState, SamplingParams, repetition_penalty_processor, sample, sample_token


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine") / "tiny"
    _build_serve_model(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def _prompt(model_dir) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode("The with statement is used to wrap the execution of a block").ids


@torch.no_grad()
def test_runner_prefill_and_decode_match_model(model, model_dir):
    ids = torch.tensor([_prompt(model_dir)])
    ref = model(ids)[0]  # [T, vocab]
    n = ids.shape[1]
    runner = ModelRunner(model, "float32")
    cache = runner.allocate_cache(3, CTX)
    k = n - 4
    first = runner.forward(ids[:, :k], torch.arange(k)[None], cache, torch.tensor([2]))
    torch.testing.assert_close(first[0], ref[k - 1], rtol=1e-4, atol=1e-4)
    for t in range(k, n):  # decode the rest one token at a time from slot 2
        out = runner.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache, torch.tensor([2]))
        torch.testing.assert_close(out[0], ref[t], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_batched_padded_prefill_equals_one_by_one(model, model_dir):
    prompt = _prompt(model_dir)
    prompts = [prompt[:5], prompt, prompt[3:9]]
    runner = ModelRunner(model, "float32")
    cache = runner.allocate_cache(4, CTX)
    T = max(map(len, prompts))
    ids = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    rows = torch.tensor([3, 0, 1])  # not contiguous: the gather path
    batched = runner.forward(ids, torch.arange(T).expand(3, T), cache, rows, torch.tensor([len(p) - 1 for p in prompts]))
    for i, p in enumerate(prompts):
        single = model(torch.tensor([p]))[0, -1]
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-4)
    # the next decode step of every row sees only its own prompt (pads were overwritten / masked)
    nxt = torch.tensor([[7], [8], [9]])
    pos = torch.tensor([[len(p)] for p in prompts])
    step = runner.forward(nxt, pos, cache, rows)
    for i, p in enumerate(prompts):
        ref = model(torch.tensor([p + [int(nxt[i])]]))[0, -1]
        torch.testing.assert_close(step[i], ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("dtype,quantize,tol", [("bfloat16", None, 0.1), ("float32", "int8", 0.1),
                                                     ("float32", "int4", 0.5)])
def test_low_precision_runner_is_close(model, model_dir, dtype, quantize, tol):
    ids = torch.tensor([_prompt(model_dir)])
    ref = torch.log_softmax(model(ids)[0, -1], -1)
    runner = ModelRunner(model, dtype, quantize)
    assert runner.act_dtype == (torch.float32 if quantize else torch.bfloat16)  # int8 / int4: float32 around them
    out = torch.log_softmax(runner.forward(ids, torch.arange(ids.shape[1])[None], runner.allocate_cache(1, CTX),
                                           torch.tensor([0])), -1)[0]
    p = ref.exp()
    kl = float((p * (ref - out)).sum())
    assert 0 <= kl < tol * 0.1, kl


def test_runner_rejects_bad_options(model):
    with pytest.raises(ValueError, match="dtype"):
        ModelRunner(model, "float8")
    with pytest.raises(ValueError, match="quantize"):
        ModelRunner(model, "float32", "int3")


def test_int8_weight_quantisation_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)
    lin = torch.nn.Linear(96, 64)
    x = torch.randn(5, 96)
    y = Int8Linear(lin, torch.float32)(x)
    torch.testing.assert_close(y, lin(x), rtol=0.02, atol=0.05)


def test_int4_weight_quantisation_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    packed, sz = quantize_weight_int4(w, group_size=32, dtype=torch.float32)
    assert sz.shape == (3, 64, 2)  # [groups, out, (scale, zero)]
    deq = int4_linear(torch.eye(96), packed, sz, 32).T  # [out, in]: the weights the kernel multiplies by
    scale = sz[:, :, 0].T.repeat_interleave(32, dim=1)
    assert torch.all((deq - w).abs() <= scale / 2 + 1e-5)
    lin = torch.nn.Linear(96, 64)
    x = torch.randn(5, 96)
    torch.testing.assert_close(Int4Linear(lin, 32, torch.float32)(x), lin(x), rtol=0.1, atol=0.15)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight_int4(torch.randn(8, 40), group_size=32)


def test_int4_perplexity_delta_is_bounded(model, model_dir):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = torch.tensor(tok.encode(topics["while"] + topics["for"]).ids[:400])
    base = perplexity(model, ids, window=CTX - 1)
    quant = perplexity(quantize_llama_int4(copy.deepcopy(model)), ids, window=CTX - 1)
    assert abs(quant / base - 1) < 0.10, (base, quant)


def test_int8_perplexity_delta_is_small(model, model_dir):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = torch.tensor(tok.encode(topics["while"] + topics["for"]).ids[:400])
    base = perplexity(model, ids, window=CTX - 1)
    quant = perplexity(quantize_llama_int8(copy.deepcopy(model)), ids, window=CTX - 1)
    assert abs(quant / base - 1) < 0.02, (base, quant)


def test_engine_int8_int4_and_bf16_generate(model_dir):
    for kw in ({"dtype": "bfloat16"}, {"quantize": "int8"}, {"quantize": "int4"}):
        eng = Engine.from_folder(model_dir, max_num_seqs=2, max_model_len=CTX, **kw)
        try:
            res = eng.generate_text("The for statement", SamplingParams(temperature=0.0, max_tokens=6,
                                                                         logit_bias={i: -100 for i in eng.eos_token_ids}))
            assert res.completion_tokens == 6
        finally:
            eng.shutdown()


# -- sampler ------------------------------------------------------------------------------------------------------
def test_top_k_and_min_p_truncate():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -5.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 1.0, g, top_k=1) for _ in range(30)} == {1}
    assert {sample_token(logits, 1.0, 1.0, g, top_k=2) for _ in range(60)} == {1, 3}
    # min_p keeps tokens with prob >= min_p * p_max: 3.0 and 2.9 are close, 1.0 is e^-2 of the max
    assert {sample_token(logits, 1.0, 1.0, g, min_p=0.5) for _ in range(60)} == {1, 3}
    with pytest.raises(ValueError):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0.0)


def test_repetition_penalty_processor():
    proc = repetition_penalty_processor(2.0, prompt_ids=[0])
    out = proc([2], torch.tensor([4.0, 4.0, -4.0, 1.0]))
    assert out.tolist() == [2.0, 4.0, -8.0, 1.0]  # seen in prompt (0) or output (2): positive / 2, negative * 2


def test_logprobs_are_raw_log_softmax_and_sorted():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.5]])
    state = SamplerState(SamplingParams(temperature=0.0, logprobs=2))
    res = sample(logits, [state], [[]])[0]
    lp = torch.log_softmax(logits[0], -1)
    assert res.token == 1 and res.logprob == pytest.approx(float(lp[1]))
    assert [t for t, _ in res.top] == [1, 3]
    assert res.top[1][1] == pytest.approx(float(lp[3]))


def test_seeded_sampling_independent_of_batch_composition(model_dir):
    eng = Engine.from_folder(model_dir, max_num_seqs=8, max_model_len=CTX)
    try:
        bias = {i: -100 for i in eng.eos_token_ids}
        params = SamplingParams(temperature=1.0, top_k=50, min_p=0.01, max_tokens=20, seed=42, logit_bias=bias)
        alone = eng.generate_text("Exceptions are", params).token_ids
        others, results = [], {}

        def run(i):
            results[i] = eng.generate_text("Exceptions are" if i == 0 else f"other {i}", SamplingParams(
                temperature=1.0, max_tokens=15 + i, seed=i, logit_bias=bias)).token_ids

        others = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in others:
            t.start()
        mine = eng.generate_text("Exceptions are", params).token_ids
        for t in others:
            t.join()
        assert mine == alone
    finally:
        eng.shutdown()


def test_vllm_engine_flag_without_vllm(model_dir, monkeypatch):
    import importlib.util

    from lmforge.serve import vllm_backend
    from lmforge.serve.api import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(vllm_backend.VLLMNotInstalledError, match="--engine vllm needs vLLM"):
        serve(model_dir, engine_kind="vllm")
    cmd = vllm_backend.vllm_command(model_dir, "127.0.0.1", 8001, "tiny", 512, 8, api_key="k")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny" and cmd[cmd.index("--api-key") + 1] == "k"
    with pytest.raises(ValueError, match="engine must be"):
        serve(model_dir, engine_kind="tgi")
