"""The chunked linear + cross-entropy equals the plain head + F.cross_entropy in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.llama import Llama, LlamaConfig
from lmforge.train.loss import linear_cross_entropy


def _inputs(n: int = 37, hidden: int = 24, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, y


def _value_and_grads(fn, h, w, y, dtype):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = fn(h, w, y)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    return loss.detach(), h.grad, w.grad


def _reference(h, w, y, ignore_index=-100):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=ignore_index)


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])  # one row, uneven last chunk, exact fit, one chunk
def test_matches_reference_fp32(chunk):
    h, w, y = _inputs()
    ref = _value_and_grads(_reference, h, w, y, torch.float32)
    got = _value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=chunk), h, w, y, torch.float32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_matches_reference_bf16_autocast():
    h, w, y = _inputs(n=64, hidden=32, vocab=96)
    ref = _value_and_grads(_reference, h, w, y, torch.bfloat16)
    got = _value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=16), h, w, y, torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)  # same bf16 logits, float32 softmax
    for a, b in zip(got[1:], ref[1:]):  # bf16 matmuls: compare at bf16 precision
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    # and far closer to the reference than a float32 run is: autocast really ran in bf16
    fp32 = _value_and_grads(_reference, h, w, y, torch.float32)
    assert (got[0] - ref[0]).abs() < (fp32[0] - ref[0]).abs()


def test_ignore_index_and_3d_hidden():
    h, w, y = _inputs(n=24)
    y = y.clone()
    y[::3] = -100
    ref = _value_and_grads(lambda h, w, y: _reference(h, w, y), h, w, y, torch.float32)
    got = _value_and_grads(lambda h, w, y: linear_cross_entropy(h.view(4, 6, -1), w, y.view(4, 6), chunk_size=5),
                           h, w, y, torch.float32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert bool((got[1][::3] == 0).all())  # ignored rows get no gradient


def test_no_grad_gives_the_loss_only():
    h, w, y = _inputs()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, y, chunk_size=10)
    torch.testing.assert_close(got, _reference(h, w, y).detach(), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    h, w, y = _inputs(n=10)
    with pytest.raises(ValueError, match=r"hidden \(10, 24\) and targets \(9,\)"):
        linear_cross_entropy(h, w, y[:9])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, y, chunk_size=0)


def test_llama_training_step_equals_plain_loss():
    """``return_hidden`` + the fused loss gives the same loss and parameter gradients as ``Llama.loss`` (tied head)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (3, 16), generator=g)
    y = torch.randint(0, 64, (3, 16), generator=g)
    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg)
        model.init_weights(seed=0)
        if fused:
            loss = linear_cross_entropy(model(x, return_hidden=True), model.lm_head.weight, y, chunk_size=20)
        else:
            loss = model.loss(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain), (fused_loss, fused) = grads
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain.keys() == fused.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_forward_compiles_without_graph_breaks():
    """The default-positions path checks the length without reading a tensor back, so torch.compile sees one graph."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16)
    model = Llama(cfg)
    explanation = torch._dynamo.explain(model)(torch.zeros(2, 16, dtype=torch.long), return_hidden=True)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with pytest.raises(ValueError, match="position 16 exceeds the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
