"""Engine.generate_batch (offline batches with shared prompts) and Engine.load_weights (in-place weight updates)."""

import pytest
import torch

from lmforge.model.hf import load_model
from lmforge.serve.engine import Engine, SamplingParams, _prefill_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generate_batch_matches_one_by_one_and_shares_prompts(tiny_model_dir):
    eng = Engine.from_folder(tiny_model_dir, max_num_seqs=8, max_model_len=128)
    p1 = eng.encode_chat([{"role": "user", "content": "What is a list in Python?"}])
    p2 = eng.encode_chat([{"role": "user", "content": "How are you today?"}])
    prompts = [p1] * 4 + [p2] * 4
    params = [SamplingParams(max_tokens=6, seed=i) for i in range(8)]
    batch = eng.generate_batch(prompts, params)
    assert eng.prefix_cache_hits >= 3 * (len(p1) - 1) + 3 * (len(p2) - 1)  # copies reuse the first's cache
    for p, sp, got in zip(prompts, params, batch):
        one = Engine.from_folder(tiny_model_dir, max_num_seqs=1, max_model_len=128).generate_text(p, sp)
        assert got.token_ids == one.token_ids and got.text == one.text
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        eng.generate_batch([p1, p2], [params[0]])


def test_generate_batch_prefills_each_distinct_prompt_once_across_chunks(tiny_model_dir):
    # prompts several chunks long: the copies join only once their prompt is cached whole, and compute its last token
    eng = Engine.from_folder(tiny_model_dir, max_num_seqs=8, max_model_len=128, prefill_chunk_size=32)
    p1 = eng.encode_chat([{"role": "user", "content": "What is a list in Python? Explain it in a few words."}])
    p2 = eng.encode_chat([{"role": "user", "content": "How are you today? Tell me about the weather."}])
    assert 32 < len(p1) < 64 and 32 < len(p2) < 64  # the second prompt starts in the first one's last chunk
    prompts = [p1] * 4 + [p2] * 4
    params = [SamplingParams(max_tokens=4, seed=i) for i in range(8)]
    batch = eng.generate_batch(prompts, params)
    shared = next(i for i, (a, b) in enumerate(zip(p1, p2)) if a != b)  # the chat template's head
    assert eng.prefill_tokens_computed == len(p1) + len(p2) - shared + 6  # each prompt once, one token per copy
    assert eng.prefix_cache_hits == 3 * (len(p1) - 1) + 3 * (len(p2) - 1) + shared
    for p, sp, got in zip(prompts, params, batch):
        one = Engine.from_folder(tiny_model_dir, max_num_seqs=1, max_model_len=128).generate_text(p, sp)
        assert got.token_ids == one.token_ids


def test_prefill_groups_bound_padding():
    assert _prefill_groups([5, 5, 4]) == [[0, 1, 2]]  # little padding: one pass, in order
    assert _prefill_groups([344, 168]) == [[0], [1]]  # 688 padded rows for 512: apart
    assert _prefill_groups([1] * 14 + [182]) == [[14], list(range(14))]  # the long chunk apart, the short together
    assert _prefill_groups([10, 2, 9, 3]) == [[0, 2], [3, 1]]
    for lens in ([7], [3, 1, 8, 8, 2, 30, 29]):
        groups = _prefill_groups(lens)
        assert sorted(i for g in groups for i in g) == list(range(len(lens)))
        for g in groups:  # padding within a quarter of each pass's rows
            assert 4 * sum(lens[i] for i in g) >= 3 * len(g) * max(lens[i] for i in g)


def test_unequal_prompts_in_one_step_prefill_apart_with_unchanged_output(tiny_model_dir):
    eng = Engine.from_folder(tiny_model_dir, max_num_seqs=4, max_model_len=128)
    passes = []
    forward = eng.runner.forward
    eng.runner.forward = lambda ids, *a, **k: passes.append(tuple(ids.shape)) or forward(ids, *a, **k)
    long = eng.encode("The with statement is used to wrap the execution of a block with methods defined by a context "
                      "manager. This allows common try except finally usage patterns to be encapsulated.")
    short = eng.encode("An assert statement")
    params = SamplingParams(temperature=0.0, max_tokens=3)
    got = eng.generate_batch([long, short], params)
    assert passes[:2] == [(1, len(long)), (1, len(short))]  # apart: no padding of the short prompt to the long one
    for p, res in zip([long, short], got):
        one = Engine.from_folder(tiny_model_dir, max_num_seqs=1, max_model_len=128).generate_text(p, params)
        assert res.token_ids == one.token_ids


def test_load_weights_updates_serving_weights_in_place(tiny_model_dir):
    eng = Engine.from_folder(tiny_model_dir, max_num_seqs=2, max_model_len=64)
    before = [t.data_ptr() for t in eng.runner.tensors()]
    other = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    want = other(ids)[0, -1]
    eng.load_weights(other)
    assert [t.data_ptr() for t in eng.runner.tensors()] == before  # the same tensors, new values
    got = eng.runner.forward(ids, torch.arange(5)[None], eng.cache, torch.tensor([0]))[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert eng._slot_tokens == [[], []]  # stale cached prefixes are forgotten
