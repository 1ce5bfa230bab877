"""Chunked prefill: a long prompt is computed a chunk per engine step, so streams already running get a token every
step while it is admitted; the chunked prompt's output equals the one-pass prefill's, with prefix caching too."""

from __future__ import annotations

import math

import pytest
import torch
from test_serve import _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("The with statement is used to wrap the execution of a block with methods defined by a context manager. "
        "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list) or "
        "other iterable object. An assert statement is a convenient way to insert debugging assertions into a "
        "program. The import statement finds a module, loads and initializes it if necessary.")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chunked") / "tiny"
    _build_serve_model(folder, ctx=512)
    return folder


def _engine(model_dir, **kw) -> Engine:
    eng = Engine.from_folder(model_dir, max_num_seqs=4, max_model_len=None, **kw)
    eng._ensure_worker = lambda: None  # the test drives step() itself
    return eng


def _params(eng: Engine, n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, logit_bias={i: -100.0 for i in eng.eos_token_ids},
                          logprobs=0)


def _tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_running_stream_gets_a_token_every_step_while_a_long_prompt_is_prefilled(model_dir):
    chunk = 16
    eng = _engine(model_dir, prefill_chunk_size=chunk)
    long_prompt = eng.encode(TEXT)
    assert len(long_prompt) > 5 * chunk
    running: list = []
    eng.add_request(eng.encode("An assert statement"), _params(eng, 80), running.append)
    eng.step()
    eng.step()
    late: list = []
    eng.add_request(long_prompt, _params(eng, 5), late.append)
    steps = 0
    while not late:
        before = len(_tokens(running))
        eng.step()
        steps += 1
        assert len(_tokens(running)) == before + 1  # never stalled by the admission
    assert steps == math.ceil(len(long_prompt) / chunk)  # one chunk per step
    while eng.has_work():
        eng.step()
    assert eng.prefill_tokens_computed == len(long_prompt) + len(eng.encode("An assert statement"))

    whole = _engine(model_dir, prefill_chunk_size=None)  # the one-pass prefill gives the same output
    ref: list = []
    whole.add_request(long_prompt, _params(whole, 5), ref.append)
    whole.step()
    assert ref  # first token after a single step
    while whole.has_work():
        whole.step()
    assert _tokens(late) == _tokens(ref)
    torch.testing.assert_close(torch.tensor([lp.logprob for o in late for lp in o.logprobs]),
                               torch.tensor([lp.logprob for o in ref for lp in o.logprobs]), rtol=1e-4, atol=1e-4)


def test_chunks_of_several_prompts_share_a_step_and_reuse_cached_prefixes(model_dir):
    eng = _engine(model_dir, prefill_chunk_size=24)
    ref = _engine(model_dir, prefill_chunk_size=None, enable_prefix_caching=False)
    ids = eng.encode(TEXT)
    prompts = [ids[:70], ids[:40] + ids[80:110], ids[5:20]]
    results = {}
    for e in (eng, ref):
        outs = [[] for _ in prompts]
        e.add_request(prompts[0], _params(e, 6), outs[0].append)
        while e.has_work():
            e.step()
        for p, out in zip(prompts[1:], outs[1:]):
            e.add_request(p, _params(e, 6), out.append)
        while e.has_work():
            e.step()
        results[e] = outs
    for a, b in zip(results[eng], results[ref]):
        assert _tokens(a) == _tokens(b) and len(_tokens(a)) == 6
    assert eng.prefix_cache_hits >= 39  # the second prompt's first 40 tokens came from the first's slot
    assert eng.prefill_tokens_computed == sum(map(len, prompts)) - eng.prefix_cache_hits


def test_bad_chunk_size(model_dir):
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        Engine.from_folder(model_dir, prefill_chunk_size=0)
