"""Prefix caching (a shared prompt prefix is computed once and its keys/values reused) and the scheduler's per-step
token budget (``max_num_batched_tokens``)."""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import OpenAI
from test_serve import _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.smoke import running_server

SYSTEM = "The with statement is used to wrap the execution of a block with methods defined by a context manager."
QUESTIONS = ["The for statement is used", "An assert statement", "The import statement", "A class definition"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix") / "tiny"
    _build_serve_model(folder)
    return folder


def _engine(model_dir, **kw) -> Engine:
    return Engine.from_folder(model_dir, max_num_seqs=kw.pop("max_num_seqs", 4), max_model_len=None, **kw)


def _manual(engine: Engine) -> Engine:
    """Drive the engine with ``step()`` from the test (no worker thread), so admission is deterministic."""
    engine._ensure_worker = lambda: None
    return engine


def _params(engine: Engine, **kw) -> SamplingParams:
    no_eos = {i: -100.0 for i in engine.eos_token_ids}  # run to max_tokens
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "logit_bias": no_eos, "logprobs": 0, **kw})


def _run_all(engine: Engine) -> None:
    while engine.has_work():
        engine.step()


def _submit(engine: Engine, prompt: list[int], params: SamplingParams) -> list:
    outs: list = []
    engine.add_request(prompt, params, outs.append)
    return outs


def _tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _logprobs(outs: list) -> torch.Tensor:
    return torch.tensor([lp.logprob for o in outs for lp in (o.logprobs or [])])


def test_prefix_cache_reuses_finished_and_running_slots_with_identical_output(model_dir):
    cached, plain = _manual(_engine(model_dir)), _manual(_engine(model_dir, enable_prefix_caching=False))
    prompts = [cached.encode(f"{SYSTEM} {q}") for q in QUESTIONS]
    shared = len(cached.encode(SYSTEM)) - 1  # the last system token may merge with what follows
    results = {}
    for eng in (cached, plain):
        params = _params(eng)
        first = _submit(eng, prompts[0], params)
        _run_all(eng)  # prompt 0 finished: its slot is free but keeps its keys/values
        second = _submit(eng, prompts[1], params)
        eng.step()  # prompt 1 is now running ...
        third = _submit(eng, prompts[2], _params(eng, temperature=0.8, seed=7))  # ... and prompt 2 joins it
        fourth = _submit(eng, prompts[3], params)
        _run_all(eng)
        results[eng] = [first, second, third, fourth]

    for a, b in zip(results[cached], results[plain]):
        assert _tokens(a) == _tokens(b) and len(_tokens(a)) == 8
        torch.testing.assert_close(_logprobs(a), _logprobs(b), rtol=1e-4, atol=1e-4)
        assert a[-1].finish_reason == b[-1].finish_reason == "length"

    total = sum(map(len, prompts))
    assert plain.prefill_tokens_computed == total and plain.prefix_cache_hits == 0
    assert cached.prefix_cache_queries == total
    assert cached.prefix_cache_hits >= 3 * shared  # prompts 1-3 each reused at least the system prompt
    assert cached.prefill_tokens_computed == total - cached.prefix_cache_hits
    assert len(cached._free_slots) == cached.max_num_seqs


def test_prefix_cache_copies_from_a_running_sequence(model_dir):
    """With every other slot empty, the only place the shared prefix can come from is the running sequence."""
    eng = _manual(_engine(model_dir, max_num_seqs=2))
    ref = _manual(_engine(model_dir, max_num_seqs=2, enable_prefix_caching=False))
    a, b = (eng.encode(f"{SYSTEM} {q}") for q in QUESTIONS[:2])
    outs = {}
    for e in (eng, ref):
        _submit(e, a, _params(e, max_tokens=20))
        e.step()
        e.step()
        outs[e] = _submit(e, b, _params(e))
        _run_all(e)
    assert eng.prefix_cache_hits >= len(eng.encode(SYSTEM)) - 1
    assert _tokens(outs[eng]) == _tokens(outs[ref])
    torch.testing.assert_close(_logprobs(outs[eng]), _logprobs(outs[ref]), rtol=1e-4, atol=1e-4)


def test_identical_prompt_reuses_all_but_its_last_token(model_dir):
    eng = _manual(_engine(model_dir))
    prompt = eng.encode(SYSTEM)
    first = _submit(eng, prompt, _params(eng))
    _run_all(eng)
    again = _submit(eng, prompt, _params(eng))
    _run_all(eng)
    assert eng.prefix_cache_hits == len(prompt) - 1  # the last token is recomputed for the first logits
    assert _tokens(first) == _tokens(again)


def test_batched_token_budget_queues_admissions(model_dir):
    eng = _manual(_engine(model_dir, max_num_seqs=4, max_num_batched_tokens=20, enable_prefix_caching=False))
    ids = eng.encode(SYSTEM)
    prompts = [ids[0:12], ids[3:15], ids[6:18]]  # 12 tokens each
    outs = [_submit(eng, p, _params(eng, max_tokens=4)) for p in prompts]
    eng.step()  # only the first prompt fits in 20 tokens
    assert (eng.num_running, eng.num_waiting) == (1, 2)
    eng.step()  # 1 decode token + the second prompt fit; the third waits
    assert (eng.num_running, eng.num_waiting) == (2, 1)
    _run_all(eng)
    assert all(o[-1].finish_reason == "length" and len(_tokens(o)) == 4 for o in outs)

    lone = _manual(_engine(model_dir, max_num_seqs=4, max_num_batched_tokens=4))
    out = _submit(lone, prompts[0], _params(lone, max_tokens=3))  # longer than the budget: runs when alone
    lone.step()
    assert lone.num_running == 1
    _run_all(lone)
    assert len(_tokens(out)) == 3
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        _engine(model_dir, max_num_batched_tokens=0)


def test_prefix_cache_counters_in_metrics(model_dir):
    eng = _engine(model_dir)
    try:
        with running_server(eng, "tiny") as url:
            client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            for q in QUESTIONS[:2]:
                client.chat.completions.create(model="tiny", max_tokens=3, temperature=0.0, messages=[
                    {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    finally:
        eng.shutdown()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:prefix_cache")}
    assert values["vllm:prefix_cache_queries_total"] == eng.prefix_cache_queries > 0
    assert values["vllm:prefix_cache_hits_total"] == eng.prefix_cache_hits >= len(eng.encode(SYSTEM)) - 1
