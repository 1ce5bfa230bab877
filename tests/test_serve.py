"""Serving: engine (KV cache, sampling, stop handling), OpenAI-compatible API through the official client, errors."""

from __future__ import annotations

import io
import json
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from lmforge.model.hf import save_model
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.serve.detokenize import IncrementalDetokenizer, StopStringMatcher
from lmforge.serve.engine import Engine, PromptTooLongError
from lmforge.serve.sampling import SamplingParams, sample_token
from lmforge.serve.smoke import running_server

CTX = 128


def _build_serve_model(folder, ctx: int = CTX) -> None:
    from pydoc_data.topics import topics

    from lmforge.tokenizer.bpe import train_bpe

    tok = train_bpe(list(topics.values()), 512, folder)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx,
                      bos_token_id=eos, eos_token_id=eos)
    model = Llama(cfg)
    model.init_weights(seed=0)
    save_model(model, folder)


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory):
    """A tiny random Llama + a BPE trained on Python's pydoc topics, in one HF-layout folder."""
    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    _build_serve_model(folder)
    return folder


@pytest.fixture(scope="module")
def engine(serve_model_dir):
    eng = Engine.from_folder(serve_model_dir, max_num_seqs=4, max_model_len=None)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, "tiny-chat") as base_url:
        yield base_url


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)


def _no_eos(engine) -> dict[str, float]:
    """logit_bias that bans the stop tokens, so a random model always runs to max_tokens."""
    return {str(i): -100 for i in engine.chat_stop_token_ids}


# -- pieces --------------------------------------------------------------------------------------------------------------
def test_stop_string_matcher_spans_deltas_and_holds_back():
    m = StopStringMatcher(["STOP", "##"])
    outs = []
    for delta in ["hello S", "T", "O", "x and S", "TO", "P tail"]:
        text, hit = m.feed(delta)
        outs.append(text)
        if hit:
            break
    assert "".join(outs) == "hello STOx and "
    assert hit
    assert outs[1] == ""  # "S" + "T" could still become STOP: held back
    m2 = StopStringMatcher(["abc"])
    assert m2.feed("xab") == ("x", False)
    assert m2.flush() == "ab"  # at the end, held-back text is released


def test_incremental_detokenizer_never_emits_half_characters(engine):
    text = "café – 日本語 ✓ naïve"
    ids = engine.encode(text)
    det = IncrementalDetokenizer(engine.tokenizer)
    deltas = [det.push(i) for i in ids] + [det.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_sampler_greedy_top_p_and_seed():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_token(logits, 0.0, 1.0, None) == 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [sample_token(logits, 1.0, 1.0, g1) for _ in range(20)]
    assert a == [sample_token(logits, 1.0, 1.0, g2) for _ in range(20)]
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 0.5, g) for _ in range(50)} <= {1, 3}  # nucleus keeps the top two


def test_logits_processor_plugs_into_sampling(engine):
    banned = set(range(engine.vocab_size)) - {42}

    def only_42(output_ids, logits):  # what a grammar mask will look like
        logits = logits.clone()
        logits[sorted(banned)] = float("-inf")
        return logits

    res = engine.generate_text("def f():", SamplingParams(temperature=1.0, max_tokens=5, seed=0,
                                                         logits_processors=[only_42]))
    assert res.token_ids == [42] * 5


# -- engine --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _full_recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]), last_only=True)[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_decode_matches_full_recompute(engine):
    prompts = ["The with statement", "Python lists are", "x = 1\nwhile x:"]
    params = SamplingParams(temperature=0.0, max_tokens=24, logit_bias={i: -100 for i in engine.eos_token_ids})
    for p in prompts:
        ids = engine.encode(p)
        expected = _full_recompute_greedy(engine.model, ids, 24)
        # (the bias only keeps the engine from stopping early; the unbiased reference does not pick eos here)
        res = engine.generate_text(ids, params)
        assert res.token_ids == expected
        assert res.finish_reason == "length" and res.completion_tokens == 24


def test_concurrent_requests_batch_and_match_single(engine):
    prompts = ["The with statement", "Python lists are", "x = 1\nwhile x:", "import sys"]
    params = SamplingParams(temperature=0.0, max_tokens=16, logit_bias={i: -100 for i in engine.eos_token_ids})
    single = [engine.generate_text(p, params).token_ids for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i):
        results[i] = engine.generate_text(prompts[i], params).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == single
    assert not engine.has_work()


def test_engine_abandoned_generator_frees_its_slot(engine):
    gen = engine.generate("abandon me", SamplingParams(temperature=1.0, max_tokens=CTX - 10, seed=0,
                                                       logit_bias={i: -100 for i in engine.eos_token_ids}))
    next(gen)
    gen.close()  # the consumer walks away: the request is aborted
    for _ in range(200):
        if not engine.has_work():
            break
        threading.Event().wait(0.01)
    assert not engine.has_work() and len(engine._free_slots) == engine.max_num_seqs


def test_engine_prompt_too_long(engine):
    with pytest.raises(PromptTooLongError):
        engine.generate_text(list(range(10, 10 + CTX)), SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLongError):
        engine.generate_text([10, 11], SamplingParams(max_tokens=CTX))


def test_chat_template_and_chat_stop_tokens(engine):
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    text = engine.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.tokenizer.token_to_id("<|im_end|>") in engine.chat_stop_token_ids
    assert engine.tokenizer.token_to_id("<|endoftext|>") in engine.chat_stop_token_ids


# -- HTTP through the official client ------------------------------------------------------------------------------------
def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert httpx.get(server.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_chat_completion_max_tokens_and_usage(client, engine):
    messages = [{"role": "user", "content": "What is a list?"}]
    resp = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=7, temperature=0.0,
                                          logit_bias=_no_eos(engine))
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    n_prompt = len(engine.encode_chat(messages))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (n_prompt, 7,
                                                                                                 n_prompt + 7)
    # the same request through the engine gives the same text (greedy)
    ref = engine.generate_text(engine.encode_chat(messages), SamplingParams(
        temperature=0.0, max_tokens=7, logit_bias={int(k): v for k, v in _no_eos(engine).items()}))
    assert choice.message.content == ref.text


def test_chat_streaming_matches_non_streaming(client, engine):
    kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=1.0,
              seed=3, logit_bias=_no_eos(engine))
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_non_streaming_and_streaming(client, engine):
    prompt = "The for statement"
    resp = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=9, temperature=0.0,
                                     logit_bias=_no_eos(engine))
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(engine.encode(prompt)) and resp.usage.completion_tokens == 9
    stream = client.completions.create(model="tiny-chat", prompt=[prompt], max_tokens=9, temperature=0.0,
                                       logit_bias=_no_eos(engine), stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    echo = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=9, temperature=0.0,
                                     logit_bias=_no_eos(engine), echo=True)
    assert echo.choices[0].text == prompt + resp.choices[0].text


def test_seed_reproducible_and_seeds_differ(client, engine):
    def ask(seed):
        return client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16,
            temperature=1.0, seed=seed, logit_bias=_no_eos(engine)).choices[0].message.content

    a = ask(1)
    assert ask(1) == a
    assert ask(2) != a
    two = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], n=2,
                                         max_tokens=16, temperature=1.0, seed=7, logit_bias=_no_eos(engine))
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == 32


def test_stop_strings(client, engine):
    kw = dict(model="tiny-chat", prompt="Exceptions are", max_tokens=40, temperature=1.0, seed=11,
              logit_bias=_no_eos(engine))
    full = client.completions.create(**kw).choices[0].text
    # pick a two-character stop string from the middle of the unconstrained output
    k = next(k for k in range(len(full) // 2, len(full) - 2)
             if "\ufffd" not in full[k:k + 2] and full[k:k + 2].strip())
    stop = full[k:k + 2]
    expected = full[:full.find(stop)]
    resp = client.completions.create(stop=[stop, "never-seen-zzz"], **kw)
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == expected


# -- errors ----------------------------------------------------------------------------------------------------------
def _assert_envelope(resp: httpx.Response, status: int):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404
    err = _assert_envelope(httpx.post(f"{server}/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_validation_errors_are_400(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                       temperature=5)
    assert exc.value.status_code == 400
    err = _assert_envelope(httpx.post(f"{server}/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"
    _assert_envelope(httpx.post(f"{server}/chat/completions", json={"model": "tiny-chat"}), 400)  # no messages
    for bad in ({"top_p": 0}, {"max_tokens": 0}, {"n": 0}, {"stop": ["a", "b", "c", "d", "e"]}, {"seed": "x"},
                {"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]}, {"top_logprobs": 2},
                {"logprobs": True, "top_logprobs": 21}, {"top_k": -2}, {"min_p": 1.5}, {"repetition_penalty": 0}):
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], **bad}
        _assert_envelope(httpx.post(f"{server}/chat/completions", json=body), 400)
    _assert_envelope(httpx.post(f"{server}/completions", json={"model": "tiny-chat"}), 400)  # no prompt
    _assert_envelope(httpx.post(f"{server}/completions", json={"model": "tiny-chat", "prompt": ["a"] * 5, "n": 16}),
                     400)  # too many choices
    # an out-of-range seed is still a seed, not a 500
    ok = httpx.post(f"{server}/completions", json={"model": "tiny-chat", "prompt": "a", "max_tokens": 2,
                                                   "seed": 2 ** 70})
    assert ok.status_code == 200, ok.text


def test_malformed_json_is_400(server):
    resp = httpx.post(f"{server}/chat/completions", content=b'{"model": "tiny-chat", "messages": [',
                      headers={"Content-Type": "application/json"})
    _assert_envelope(resp, 400)
    _assert_envelope(httpx.post(f"{server}/completions", content=b"not json",
                                headers={"Content-Type": "application/json"}), 400)


def test_prompt_longer_than_context_is_400(client, server):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 40
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny-chat", prompt=long_prompt, max_tokens=4)
    assert "context length" in str(exc.value)
    err = _assert_envelope(httpx.post(f"{server}/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": long_prompt}]}), 400)
    assert err["code"] == "context_length_exceeded"
    # prompt fits but prompt + max_tokens does not
    _assert_envelope(httpx.post(f"{server}/completions", json={
        "model": "tiny-chat", "prompt": "hello", "max_tokens": CTX}), 400)
    # a token id outside the vocabulary
    _assert_envelope(httpx.post(f"{server}/completions", json={"model": "tiny-chat", "prompt": [10 ** 6]}), 400)


def test_unknown_route_and_method_use_envelope(server):
    _assert_envelope(httpx.get(f"{server}/nothing-here"), 404)
    _assert_envelope(httpx.get(f"{server}/chat/completions"), 405)


def test_sse_stream_ends_with_done(server, engine):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "stream": True, "logit_bias": _no_eos(engine)}
    with httpx.stream("POST", f"{server}/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert raw.endswith("data: [DONE]\n\n")
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_no_requests_left_behind(engine, client):
    # a stream closed early by the client frees its slot
    stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "go"}],
                                            max_tokens=100, stream=True, logit_bias=_no_eos(engine))
    next(iter(stream))
    stream.close()
    client.models.list()
    for _ in range(200):
        if not engine.has_work():
            break
        threading.Event().wait(0.02)
    assert not engine.has_work()
    assert len(engine._free_slots) == engine.max_num_seqs


# -- smoke stage and REPL ---------------------------------------------------------------------------------------------
def test_smoke_test(serve_model_dir):
    from lmforge.serve.smoke import smoke_test

    res = smoke_test(serve_model_dir, max_tokens=8)
    assert isinstance(res["chat"], str) and isinstance(res["completion"], str)
    assert res["port"] > 0 and res["latency_s"] > 0 and res["tokens_per_s"] > 0
    assert res["model"] == "tiny-chat"


def test_smoke_test_steps_on_the_calling_thread_and_reraises_client_errors(serve_model_dir, monkeypatch):
    from lmforge.serve.smoke import smoke_test

    drivers = []
    real_step = Engine.step

    def recording_step(self, *args, **kwargs):
        drivers.append(threading.current_thread())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", recording_step)
    smoke_test(serve_model_dir, max_tokens=4)
    assert drivers and set(drivers) == {threading.current_thread()}  # the thread that loaded the model steps it

    with pytest.raises(openai.BadRequestError):  # a 400 from the server surfaces here, and nothing hangs
        smoke_test(serve_model_dir, max_tokens=0)


def test_chat_repl_keeps_history(serve_model_dir, engine):
    from rich.console import Console

    from lmforge.serve.repl import chat_repl

    out = io.StringIO()
    history = chat_repl(serve_model_dir, stdin=io.StringIO("hello\nand again\n/exit\n"), engine=engine,
                        console=Console(file=out, width=120), max_tokens=5, seed=0)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] in out.getvalue()
