"""A batch of decode rows in non-consecutive cache slots (``ModelRunner.forward`` with one token per row) through the
fused C++ step (``FusedStep.step_rows``: attention over each row's slot in place, no gather, no mask) against the
Python path it replaces (``fused=False``), the reference model, and each row decoded alone (bit for bit), for plain
Llama (GQA) and sliding-window layers with q/k norms, float32 and int8 weights."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sharp_llama

from lmforge.model.llama import Llama
from lmforge.serve import kernels
from lmforge.serve.runner import ModelRunner

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not kernels.available(), reason="the C++ kernels cannot be built here")]

CONFIGS = {
    "llama": {},
    # windows of 6 (shorter than the rows) in two of three layers, q/k norms, their own RoPE base
    "sliding": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    qk_norm=True, rope_local_theta=10000.0),
}
LENS = [9, 3, 14, 1, 20]  # rows at different positions
SLOTS = torch.tensor([4, 0, 3, 6, 1])  # not consecutive, not sorted


def _model(extra: dict) -> Llama:
    return sharp_llama(**extra)


def _prefilled(runner: ModelRunner, seqs: list[torch.Tensor]):
    cache = runner.allocate_cache(8, 32)
    for s, n, slot in zip(seqs, LENS, SLOTS):  # each row's prompt alone
        runner.forward(s[None, :n], torch.arange(n)[None], cache, slot[None])
    return cache


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_batched_decode_in_scattered_slots(family, quantize):
    model = _model(CONFIGS[family])
    fast = ModelRunner(model, "float32", quantize)
    slow = ModelRunner(model, "float32", quantize, fused=False)
    assert fast.fused is not None and slow.fused is None
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n + 2,), generator=g) for n in LENS]  # a prompt of n, then two decode tokens
    fc, sc, alone = _prefilled(fast, seqs), _prefilled(slow, seqs), _prefilled(fast, seqs)
    tol = dict(atol=1e-4, rtol=1e-4) if quantize is None else dict(atol=2e-2, rtol=2e-2)
    for step in range(2):
        ids = torch.stack([s[n + step] for s, n in zip(seqs, LENS)])[:, None]
        pos = torch.tensor(LENS)[:, None] + step
        got = fast.forward(ids, pos, fc, SLOTS)
        want = slow.forward(ids, pos, sc, SLOTS)
        assert got.shape == (5, 256)
        torch.testing.assert_close(got, want, **tol)
        if quantize is None:
            with torch.no_grad():
                ref = torch.stack([model(s[None, :n + step + 1])[0, -1] for s, n in zip(seqs, LENS)])
            torch.testing.assert_close(got, ref, **tol)
        for b in range(5):  # each row decoded alone (the single-stream fused step): the same logits, bit for bit
            one = fast.forward(ids[b:b + 1], pos[b:b + 1], alone, SLOTS[b:b + 1])
            assert torch.equal(one[0], got[b])
    for a, b, c in zip(fc.k + fc.v, sc.k + sc.v, alone.k + alone.v):
        torch.testing.assert_close(a, b, **tol)  # the same keys/values, in the rows' slots only
        assert torch.equal(a, c)
        assert not a[[2, 5, 7]].any()


def test_batched_rows_must_not_share_a_slot():
    runner = ModelRunner(_model({}), "float32")
    cache = runner.allocate_cache(4, 16)
    with pytest.raises(RuntimeError, match="share cache slot 1"):
        runner.forward(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), cache, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="cache slot 4 out of range"):
        runner.forward(torch.tensor([[1], [2]]), torch.tensor([[0], [0]]), cache, torch.tensor([0, 4]))
