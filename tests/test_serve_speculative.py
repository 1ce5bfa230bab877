"""Speculative decoding (lmforge.serve.speculative): prompt lookup and a draft model give greedy output token for token
equal to plain decoding, sampled output that follows the target's distribution (chi-square tests that can fail), KV
rollback under continuous batching, requests that cannot speculate, load-time errors, usage extras and /metrics."""

from __future__ import annotations

import logging
import random
import shutil

import httpx
import pytest
import torch
from openai import OpenAI
from test_serve import _build_serve_model

from lmforge.model.hf import load_model, save_model
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplerState, SamplingParams
from lmforge.serve.smoke import running_server
from lmforge.serve.speculative import SpeculativeConfig, propose_ngram, verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["The with statement is used to wrap the execution of a block", "An assert statement",
           "The for statement is used to iterate over the elements of a sequence", "def f(x): return x"]


def _rescale(folder, seed: int, scale: float) -> None:
    """Re-draw the weights with ``seed`` and scale the (tied) embeddings: a random model whose next-token
    distributions are peaked (it tends to repeat its input), so drafts are sometimes right and sometimes wrong."""
    model = load_model(folder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.model.embed_tokens.weight.mul_(scale)
    save_model(model, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, draft): two peaked random models with one tokenizer; the draft has other weights."""
    root = tmp_path_factory.mktemp("spec")
    _build_serve_model(root / "target", ctx=256)
    shutil.copytree(root / "target", root / "draft")
    _rescale(root / "target", 0, 6.0)
    _rescale(root / "draft", 1, 6.0)
    return root / "target", root / "draft"


def _engine(folder, spec: SpeculativeConfig | None = None, **kw) -> Engine:
    eng = Engine.from_folder(folder, max_num_seqs=kw.pop("max_num_seqs", 4), max_model_len=None, speculative=spec,
                             **kw)
    eng._ensure_worker = lambda: None  # the test drives step() itself: admissions are deterministic
    return eng


def _run(eng: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list]:
    outs: list[list] = [[] for _ in jobs]
    for (prompt, params), out in zip(jobs, outs):
        eng.add_request(prompt, params, out.append)
    while eng.has_work():
        eng.step()
    return outs


def _tokens(out: list) -> list[int]:
    return [t for o in out for t in o.token_ids]


def _spec(request: list, key: str):
    return request[-1].speculative[key]


# -- prompt lookup ---------------------------------------------------------------------------------------------------
def test_propose_ngram_takes_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # bigram [1, 2]: its latest earlier occurrence
    assert propose_ngram([5, 6, 7, 8, 9, 6, 7], 3) == [8, 9, 6]
    assert propose_ngram([7, 1, 9, 2, 1], 2, ngram_max=1) == [9, 2]  # unigrams only when asked
    assert propose_ngram([1, 2, 1, 2], 4) == [1, 2, 1, 2]  # a repeating stretch goes on repeating
    assert propose_ngram([1, 2, 3], 2) == [] and propose_ngram([4], 3) == []


# -- greedy: identical output ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_identical_under_continuous_batching(models, method):
    target, draft = models
    plain = _engine(target)
    spec = _engine(target, SpeculativeConfig(method, num_draft_tokens=3,
                                             draft_model=str(draft) if method == "draft" else None))
    no_eos = {i: -100.0 for i in plain.eos_token_ids}
    ids = [plain.encode(p) for p in PROMPTS]
    jobs = [  # five requests for four slots: one waits and joins while the others decode
        (ids[0], SamplingParams(temperature=0.0, max_tokens=40, logit_bias=no_eos)),
        (ids[1], SamplingParams(temperature=0.0, max_tokens=30, logit_bias=no_eos, logprobs=2)),
        (ids[2], SamplingParams(temperature=0.0, max_tokens=30, logit_bias=no_eos, repetition_penalty=1.3,
                                presence_penalty=0.5)),
        (ids[3], SamplingParams(temperature=0.0, max_tokens=25, logit_bias=no_eos, frequency_penalty=0.4)),
        (ids[0][:5], SamplingParams(temperature=0.0, max_tokens=7)),
    ]
    ref, got = _run(plain, jobs), _run(spec, jobs)
    for a, b in zip(ref, got):
        assert _tokens(a) == _tokens(b)
        assert a[-1].finish_reason == b[-1].finish_reason and "".join(o.text for o in a) == "".join(o.text for o in b)
    lp_ref = torch.tensor([lp.logprob for o in ref[1] for lp in o.logprobs])
    lp_got = torch.tensor([lp.logprob for o in got[1] for lp in o.logprobs])
    torch.testing.assert_close(lp_got, lp_ref, rtol=1e-4, atol=1e-4)
    assert [[t for t, _ in lp.top] for o in got[1] for lp in o.logprobs] == \
        [[t for t, _ in lp.top] for o in ref[1] for lp in o.logprobs]
    drafted = sum(_spec(r, "draft_tokens") for r in got)
    accepted = sum(_spec(r, "accepted_tokens") for r in got)
    assert 0 < accepted < drafted  # drafts were both kept and rolled back
    assert sum(_spec(r, "decode_steps") for r in got) < sum(len(_tokens(r)) - 1 for r in got)
    assert plain.spec_draft_tokens == 0 and spec.spec_draft_tokens == drafted
    assert len(spec._free_slots) == spec.max_num_seqs


def test_stop_string_inside_accepted_drafts_ends_the_request_there(models):
    target, _ = models
    plain, spec = _engine(target), _engine(target, SpeculativeConfig("ngram", num_draft_tokens=4))
    no_eos = {i: -100.0 for i in plain.eos_token_ids}
    prompt = plain.encode(PROMPTS[0])
    full = plain.generate_text(prompt, SamplingParams(temperature=0.0, max_tokens=30, logit_bias=no_eos))
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip()
    params = SamplingParams(temperature=0.0, max_tokens=30, logit_bias=no_eos, stop=[stop])
    a, b = plain.generate_text(prompt, params), spec.generate_text(prompt, params)
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert a.finish_reason == "stop" and stop not in b.text


def test_draft_model_equal_to_target_accepts_every_draft_and_warns(models, caplog):
    target, _ = models
    with caplog.at_level(logging.WARNING, logger="lmforge.serve"):
        spec = _engine(target, SpeculativeConfig("draft", num_draft_tokens=4, draft_model=str(target)))
    assert "cannot speed decoding up" in caplog.text
    no_eos = {i: -100.0 for i in spec.eos_token_ids}
    res = spec.generate_text(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=41, logit_bias=no_eos))
    s = res.speculative
    assert s["acceptance_rate"] == 1.0 and s["decode_steps"] == 8 and s["tokens_per_step"] == 5.0
    assert res.token_ids == _engine(target).generate_text(PROMPTS[2], SamplingParams(
        temperature=0.0, max_tokens=41, logit_bias=no_eos)).token_ids


# -- sampled: the target's distribution ---------------------------------------------------------------------------------
def _chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; bins expecting fewer than 5 draws are pooled."""
    keep = expected >= 5
    obs, exp = counts[keep].double(), expected[keep].double()
    if not keep.all():
        obs = torch.cat([obs, counts[~keep].sum()[None].double()])
        exp = torch.cat([exp, expected[~keep].sum()[None].double()])
    x = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2)))


@pytest.mark.parametrize("kind", ["one-hot", "draft"])
def test_verify_first_token_follows_the_target_distribution(kind):
    """The rejection rule on its own, 4,000 draws over an 8-token vocabulary; the same test rejects the
    distribution a classic bug gives (on rejection, drawing from p instead of the residual)."""
    gen = torch.Generator().manual_seed(2)
    V, N = 8, 4000
    logits = torch.randn(3, V, generator=gen) * 1.5
    q_logits = logits[0] + torch.randn(V, generator=gen)  # a draft distribution near the target's
    params = SamplingParams(temperature=0.9, seed=1)
    state = SamplerState(params)
    p = torch.softmax(logits[0] / 0.9, -1)
    q = torch.softmax(q_logits / 0.9, -1)
    counts = torch.zeros(V)
    accepted = 0
    for _ in range(N):
        d0 = int(torch.multinomial(q, 1, generator=gen))
        out, acc = verify(logits, [d0, 3], None if kind == "one-hot" else [q, q], state, [])
        counts[out[0].token] += 1
        accepted += acc > 0
    assert 0.2 * N < accepted < 0.9 * N
    assert _chi2_pvalue(counts, p * N) > 1e-3
    # the buggy rule's distribution (one-hot: P(x) = q(x) p(x) + (1 - sum q p) p(x); residual ignored)
    bug = q * torch.minimum(p / q, torch.ones(V)) if kind == "draft" else q * p
    bug = bug + (1 - bug.sum()) * p
    assert (bug - p).abs().sum() > 0.05 and _chi2_pvalue(counts, bug * N) < 1e-3


def _exact_second_token(model, prompt: list[int], bias: dict[int, float]) -> torch.Tensor:
    """P(second sampled token) at temperature 1: sum over the first token t of p(t) p(. | t)."""
    V = model.config.vocab_size
    b = torch.zeros(V)
    for i, v in bias.items():
        b[i] = v
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1] + b, -1)
        p2 = torch.cat([torch.softmax(model(torch.tensor([prompt + [t] for t in range(i, min(V, i + 128))]))[:, -1]
                                      + b, -1) for i in range(0, V, 128)])
    return p1 @ p2


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_output_follows_the_target_distribution_end_to_end(models, method):
    """1,000 seeded requests through the engine (32 at a time); the second token (the first one verified) against
    its exact distribution."""
    target, draft = models
    eng = _engine(target, SpeculativeConfig(method, num_draft_tokens=2,
                                            draft_model=str(draft) if method == "draft" else None), max_num_seqs=32)
    bias = {i: -100.0 for i in eng.eos_token_ids}
    prompt = random.Random(0).sample(range(eng.vocab_size), 8)
    prompt += eng.generate_text(prompt, SamplingParams(temperature=1.0, max_tokens=48, seed=0, logit_bias=bias)
                                ).token_ids  # the model's own habits in its context: lookups find likely drafts
    N = 1000
    outs = _run(eng, [(prompt, SamplingParams(temperature=1.0, max_tokens=3, seed=i, logit_bias=bias))
                      for i in range(N)])
    drafted = sum(_spec(o, "draft_tokens") for o in outs)
    accepted = sum(_spec(o, "accepted_tokens") for o in outs)
    assert drafted > N // 2 and 0.1 * drafted < accepted < 0.95 * drafted
    counts = torch.bincount(torch.tensor([_tokens(o)[1] for o in outs]), minlength=eng.vocab_size).float()
    assert _chi2_pvalue(counts, _exact_second_token(load_model(target), prompt, bias) * N) > 1e-3


def test_seeded_sampling_with_speculation_is_reproducible(models):
    target, _ = models
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=30, seed=123)
    runs = [_engine(target, SpeculativeConfig("ngram")).generate_text(PROMPTS[0], params) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].speculative["draft_tokens"] > 0


# -- requests the speculator cannot serve exactly; bad configuration ---------------------------------------------------
def test_custom_logits_processor_turns_speculation_off_for_that_request(models):
    target, _ = models
    eng = _engine(target, SpeculativeConfig("ngram"))
    calls = []

    def counting(history, logits):  # keeps state: one call per emitted token, as without speculation
        calls.append(len(history))
        return logits

    res = eng.generate_text(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, logits_processors=[counting]))
    assert calls == list(range(len(res.token_ids)))
    assert res.speculative["enabled"] is False and "logits processor" in res.speculative["note"]

    def pure(history, logits):
        return logits

    pure.speculation_safe = True
    res = eng.generate_text(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, logits_processors=[pure]))
    assert res.speculative["enabled"] is True


def test_bad_speculative_configuration(models, tmp_path):
    target, _ = models
    with pytest.raises(ValueError, match="method must be one of"):
        SpeculativeConfig("medusa")
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeConfig("draft")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SpeculativeConfig("ngram", num_draft_tokens=0)
    with pytest.raises(ValueError, match="does not exist"):
        _engine(target, SpeculativeConfig("draft", draft_model=str(tmp_path / "nope")))
    other = tmp_path / "other"  # same architecture, another tokenizer
    from lmforge.tokenizer.bpe import train_bpe

    train_bpe(["a completely different corpus of words " * 20, "with other merges and fewer tokens"], 300, other)
    shutil.copy(target / "config.json", other / "config.json")
    shutil.copy(target / "model.safetensors", other / "model.safetensors")
    with pytest.raises(ValueError, match="different tokenizer"):
        _engine(target, SpeculativeConfig("draft", draft_model=str(other)))


# -- over HTTP: usage extras and /metrics -----------------------------------------------------------------------------
def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_usage_extras_and_metrics_through_the_openai_client(models):
    target, _ = models
    eng = Engine.from_folder(target, max_num_seqs=4, max_model_len=None, speculative=SpeculativeConfig("ngram"))
    no_eos = {str(i): -100 for i in eng.chat_stop_token_ids}
    try:
        with running_server(eng, "tiny") as url:
            client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0.0,
                                             logit_bias=no_eos)
            spec = resp.usage.model_extra["speculative"]
            assert spec["method"] == "ngram" and spec["enabled"] is True and spec["draft_tokens"] > 0
            assert 0 < spec["acceptance_rate"] <= 1 and spec["tokens_per_step"] > 1
            chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[2]}],
                                                  max_tokens=20, temperature=0.0, logit_bias=no_eos, n=2)
            assert chat.usage.model_extra["speculative"]["draft_tokens"] > 0
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                    max_tokens=20, temperature=0.0, logit_bias=no_eos, stream=True,
                                                    stream_options={"include_usage": True})
            last = list(stream)[-1]
            assert last.usage.model_extra["speculative"]["enabled"] is True
            text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    finally:
        eng.shutdown()
    assert _metric(text, "vllm:spec_decode_num_draft_tokens_total") == eng.spec_draft_tokens > 0
    assert _metric(text, "vllm:spec_decode_num_accepted_tokens_total") == eng.spec_accepted_tokens > 0
    assert _metric(text, "lmforge:spec_decode_request_acceptance_rate_count") == 4


# -- lmforge serve flags ----------------------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "lmforge.cli", *args]


def test_serve_cli_speculative_flags(models, tmp_path):
    import os
    import socket
    import subprocess

    target, draft = models
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    bad = subprocess.run(_cli("serve", str(target), "--speculative", "draft"), capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "needs a draft model" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(_cli("serve", str(target), "--port", str(port), "--speculative", "draft", "--draft-model",
                                 str(draft), "--num-draft-tokens", "3", "--prefill-chunk-size", "32"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        banner = proc.stdout.readline()
        assert "speculative draft" in banner and "3 drafts" in banner, banner
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        from tokenizers import Tokenizer

        eos = Tokenizer.from_file(str(target / "tokenizer.json")).token_to_id("<|endoftext|>")
        resp = client.completions.create(model="target", prompt=PROMPTS[0], max_tokens=20, temperature=0.0,
                                         logit_bias={str(eos): -100})
        spec = resp.usage.model_extra["speculative"]
        assert spec["method"] == "draft" and spec["draft_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(60)
