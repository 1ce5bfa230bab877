"""The HTTP server, black-box through the official ``openai`` client: /metrics, /v1/embeddings, logprobs, vLLM's extra
sampling fields, API key, limits, disconnects, seeds under concurrency, and 64 concurrent streaming clients."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from test_serve import CTX, _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.smoke import running_server

NAME = "tiny-chat"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / NAME
    _build_serve_model(folder)
    eng = Engine.from_folder(folder, max_num_seqs=8, max_model_len=None)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, NAME, max_tokens_limit=100, max_concurrent_requests=80,
                        max_body_bytes=20_000) as url:
        yield url


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)


def _no_eos(engine) -> dict[str, float]:
    return {str(i): -100 for i in engine.chat_stop_token_ids}


def _wait_idle(engine, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.02)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_use_vllm_names_and_count(client, server, engine):
    root = server.removesuffix("/v1")
    before = httpx.get(f"{root}/metrics").text
    resp = client.completions.create(model=NAME, prompt="The for statement", max_tokens=5, temperature=0.0,
                                     logit_bias=_no_eos(engine))
    _wait_idle(engine)
    after = httpx.get(f"{root}/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"):
        _metric(text, name)
    assert _metric(text, "vllm:prompt_tokens_total") - _metric(before, "vllm:prompt_tokens_total") \
        == resp.usage.prompt_tokens
    assert _metric(text, "vllm:generation_tokens_total") - _metric(before, "vllm:generation_tokens_total") == 5
    assert _metric(text, "vllm:time_to_first_token_seconds_count") \
        - _metric(before, "vllm:time_to_first_token_seconds_count") == 1
    assert _metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:gpu_cache_usage_perc") == 0


def test_embeddings_through_the_client(client, engine):
    texts = ["The with statement", "Python lists are mutable"]
    resp = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64 by default
    assert [d.index for d in resp.data] == [0, 1]
    hidden = engine.model.config.hidden_size
    for d, t in zip(resp.data, texts):
        assert len(d.embedding) == hidden
        ref = engine.embed(engine.encode(t, add_special_tokens=False))
        np.testing.assert_allclose(d.embedding, ref.numpy(), rtol=1e-4, atol=1e-5)
    assert resp.usage.prompt_tokens == sum(len(engine.encode(t)) for t in texts)
    floats = client.embeddings.create(model=NAME, input="The with statement", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, resp.data[0].embedding, rtol=1e-6)
    # mean pooling: a different text gives a different vector
    assert not np.allclose(resp.data[0].embedding, resp.data[1].embedding)


def test_embeddings_errors(server):
    r = httpx.post(f"{server}/embeddings", json={"model": NAME, "input": ""})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(f"{server}/embeddings", json={"model": NAME, "input": "x" * 5 + " y" * (CTX + 10)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(f"{server}/embeddings", json={"model": "nope", "input": "x"}).status_code == 404


def test_chat_logprobs(client, engine):
    resp = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0.0, logprobs=True, top_logprobs=3, logit_bias=_no_eos(engine))
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
    streamed = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0, logprobs=True,
        top_logprobs=3, logit_bias=_no_eos(engine), stream=True))
    s_lp = [c for ch in streamed if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in s_lp] == [c.token for c in content]
    assert [c.logprob for c in s_lp] == pytest.approx([c.logprob for c in content])


def test_completion_logprobs(client, engine):
    resp = client.completions.create(model=NAME, prompt="The for statement", max_tokens=5, temperature=0.0,
                                     logprobs=2, logit_bias=_no_eos(engine))
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert resp.choices[0].logprobs is not None
    plain = client.completions.create(model=NAME, prompt="The for statement", max_tokens=5, temperature=0.0,
                                      logit_bias=_no_eos(engine))
    assert plain.choices[0].logprobs is None


def test_vllm_extra_sampling_fields(client, engine):
    kw = dict(model=NAME, prompt="Exceptions are", max_tokens=10, temperature=1.0, seed=5, logit_bias=_no_eos(engine))
    greedy = client.completions.create(model=NAME, prompt="Exceptions are", max_tokens=10, temperature=0.0,
                                       logit_bias=_no_eos(engine)).choices[0].text
    assert client.completions.create(extra_body={"top_k": 1}, **kw).choices[0].text == greedy
    assert client.completions.create(extra_body={"min_p": 1.0}, **kw).choices[0].text == greedy
    rep = client.completions.create(model=NAME, prompt="Exceptions are", max_tokens=10, temperature=0.0,
                                    logit_bias=_no_eos(engine), extra_body={"repetition_penalty": 5.0})
    ref = engine.generate_text("Exceptions are", SamplingParams(
        temperature=0.0, max_tokens=10, repetition_penalty=5.0,
        logit_bias={int(k): v for k, v in _no_eos(engine).items()}))
    assert rep.choices[0].text == ref.text


def test_api_key(engine):
    with running_server(engine, NAME, api_key="s3cret") as url:
        bad = OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(f"{url}/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [NAME]
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # health stays open


def test_limits(client, server, engine):
    with pytest.raises(openai.BadRequestError, match="at most 100"):
        client.completions.create(model=NAME, prompt="x", max_tokens=101)
    r = httpx.post(f"{server}/completions", json={"model": NAME, "prompt": "word " * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # an in-process request whose logits processor makes every engine step take 0.1 s, so the HTTP request below is
    # still in flight (however fast the machine) when the second one arrives
    release = threading.Event()

    def step_slowly(output_ids, logits):
        release.wait(0.1)
        return logits

    slow = threading.Thread(target=engine.generate_text, args=("slow", SamplingParams(
        max_tokens=CTX - 10, logits_processors=[step_slowly],
        logit_bias={i: -100 for i in engine.eos_token_ids})))
    slow.start()
    try:
        with running_server(engine, NAME, max_concurrent_requests=1) as url:
            blocker = OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "go"}], max_tokens=100, stream=True,
                logit_bias=_no_eos(engine))
            next(iter(blocker))  # one request in flight
            with pytest.raises(openai.RateLimitError):
                OpenAI(base_url=url, api_key="x", max_retries=0).completions.create(model=NAME, prompt="x", max_tokens=2)
            blocker.close()
    finally:
        release.set()
        slow.join(30)
    _wait_idle(engine)


def test_non_streaming_disconnect_aborts_the_request(server, engine):
    started = threading.Event()
    release = threading.Event()

    def slow(output_ids, logits):  # keeps the blocker (and so every step) slow until released
        started.set()
        release.wait(0.1)
        return logits

    blocker = threading.Thread(target=engine.generate_text, args=("slow", SamplingParams(
        max_tokens=CTX - 10, logits_processors=[slow], logit_bias={i: -100 for i in engine.eos_token_ids})))
    blocker.start()
    started.wait(10)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/completions", json={"model": NAME, "prompt": "long one", "max_tokens": 100,
                                                      "logit_bias": _no_eos(engine)}, timeout=0.5)
        deadline = time.monotonic() + 5
        while engine.num_running + engine.num_waiting > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.num_running + engine.num_waiting == 1  # only the blocker is left
    finally:
        release.set()
        blocker.join(30)
    _wait_idle(engine)
    assert len(engine._free_slots) == engine.max_num_seqs


def test_same_seed_same_output_alone_or_concurrent(server, client, engine):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me about loops"}], max_tokens=16,
              temperature=1.0, top_p=0.9, seed=1234, logit_bias=_no_eos(engine))
    alone = client.chat.completions.create(**kw).choices[0].message.content

    async def crowd():
        ac = AsyncOpenAI(base_url=server, api_key="x", max_retries=0, timeout=60)
        noise = [ac.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"noise {i}"}],
                                            max_tokens=10 + i, temperature=1.0, seed=i, logit_bias=_no_eos(engine))
                 for i in range(7)]
        mine = ac.chat.completions.create(stream=True, **kw)

        async def drain(stream_coro):
            return "".join([c.choices[0].delta.content or "" async for c in await stream_coro if c.choices])

        res = await asyncio.gather(drain(mine), *noise)
        await ac.close()
        return res[0]

    assert asyncio.run(asyncio.wait_for(crowd(), 60)) == alone


def test_64_concurrent_streaming_clients(server, engine):
    n = 64
    bias = {int(k): v for k, v in _no_eos(engine).items()}
    expected = [engine.generate_text(f"Request number {i} says", SamplingParams(
        temperature=1.0, max_tokens=8, seed=i, logit_bias=bias)).text for i in range(n)]

    async def one(ac, i):
        stream = await ac.completions.create(model=NAME, prompt=f"Request number {i} says", max_tokens=8,
                                             temperature=1.0, seed=i, logit_bias=_no_eos(engine), stream=True)
        parts, reasons = [], []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), [r for r in reasons if r]

    async def all_clients():
        ac = AsyncOpenAI(base_url=server, api_key="x", max_retries=0, timeout=120,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=n)))
        try:
            return await asyncio.gather(*(one(ac, i) for i in range(n)))
        finally:
            await ac.close()

    results = asyncio.run(asyncio.wait_for(all_clients(), 120))
    assert [r[0] for r in results] == expected  # nothing lost, nothing mixed up between clients
    assert all(r[1] == ["length"] for r in results)
    _wait_idle(engine)
    assert not engine.has_work() and len(engine._free_slots) == engine.max_num_seqs
