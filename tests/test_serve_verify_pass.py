"""The single-stream speculative verify pass (``ModelRunner.verify_logits``: one stream's last token and its drafts,
T positions, through the decode step's slicing path with a [T, S] causal mask) against the reference model and the
batched path it replaces; and the engine's greedy output with prompt lookup on one stream, token for token the plain
engine's."""

from __future__ import annotations

import pytest
import torch
from test_serve import _build_serve_model
from tiny_models import sharp_llama

from lmforge.model.llama import Llama
from lmforge.serve.engine import Engine
from lmforge.serve.runner import ModelRunner
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.speculative import SpeculativeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {
    "llama": {},
    # sliding layers (window 6, shorter than the sequence) next to a full one, q/k norms, Gemma norms, soft-capping
    "gemma-like": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                       qk_norm=True, gemma_norms=True, final_logit_softcapping=30.0, rope_local_theta=10000.0),
}


def _model(extra: dict) -> Llama:
    return sharp_llama(**extra)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("T", [1, 2, 5])
def test_verify_pass_equals_reference_and_batched_path(family, T):
    model = _model(CONFIGS[family])
    runner = ModelRunner(model, "float32")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(T)).long()
    with torch.no_grad():
        ref = model(ids)[0]  # [20, vocab]
    start = 20 - T
    fast, slow = runner.allocate_cache(3, 32), runner.allocate_cache(3, 32)
    row = torch.tensor([2])
    for cache in (fast, slow):
        runner.forward(ids[:, :start], torch.arange(start)[None], cache, row)
    got = runner.verify_logits(ids[:, start:], start, fast, 2)
    h = runner.forward(ids[:, start:], torch.arange(start, 20)[None], slow, row, hidden=True)
    batched = runner._logits(h[0])
    assert got.shape == (T, 256)
    assert torch.allclose(got, ref[start:], atol=1e-4, rtol=1e-4), (got - ref[start:]).abs().max()
    assert torch.allclose(got, batched, atol=1e-4, rtol=1e-4)
    for a, b in zip(fast.k + fast.v, slow.k + slow.v):  # the same keys/values written, in slot 2 only
        assert torch.allclose(a, b, atol=1e-6)
        assert not a[:2].any()


def test_verify_pass_past_the_cache_is_a_clear_error():
    runner = ModelRunner(_model({}), "float32")
    with pytest.raises(ValueError, match="exceeds the cache length"):
        runner.verify_logits(torch.zeros(1, 4, dtype=torch.long), 30, runner.allocate_cache(1, 32), 0)


def test_one_stream_with_prompt_lookup_is_token_for_token_plain_greedy(tmp_path):
    folder = tmp_path / "tiny"
    _build_serve_model(folder, ctx=256)
    plain = Engine.from_folder(folder, max_num_seqs=1, max_model_len=None)
    spec = Engine.from_folder(folder, max_num_seqs=1, max_model_len=None,
                              speculative=SpeculativeConfig("ngram", num_draft_tokens=4, ngram_min=1))
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompts = ["The with statement is used to wrap the execution of a block. The with statement is used to",
               "def f(x): return x\ndef g(x): return x\ndef h(x): return"]
    drafted = 0
    for p in prompts:
        a, b = plain.generate_text(p, params), spec.generate_text(p, params)
        assert b.token_ids == a.token_ids
        drafted += b.speculative["draft_tokens"]
    assert drafted > 0  # verify passes ran (prompt lookup found something to copy)
    plain.shutdown()
    spec.shutdown()
