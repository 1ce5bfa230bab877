"""The fused C++ single-stream step (``kernels/fused_step.cpp`` through ``ModelRunner.forward`` / ``verify_logits``)
against the Python path of the same runner (``fused=False``), on tiny random models.

Tolerances (logits of a few units to ~20): float32 within 1e-4 absolute (float summation order only); int8 / int4
within 2e-3 (both paths quantise activations the same way, but a last-bit difference in an activation can move one
int16 step of its block).  A verify pass of T positions gives bit for bit the logits of the T decode steps it replaces
(every output is summed in the same order whatever T is), and greedy generations are token-for-token equal."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.llama import Llama, LlamaConfig
from lmforge.serve import kernels
from lmforge.serve.runner import ModelRunner

TOL = {None: 1e-4, "int8": 2e-3, "int4": 2e-3}
FAMILIES = {
    "gqa": {},
    "qkv_bias": {"qkv_bias": True, "attention_bias": True},
    "sliding": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    "qk_norm": {"qk_norm": True},
}


@pytest.fixture(scope="module")
def ext():
    module = kernels.load()
    if module is None:
        pytest.skip("the C++ extension cannot be built here (the fallback is tested below)")
    return module


def _model(**switches) -> Llama:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, **switches)
    m = Llama(cfg)
    m.init_weights(seed=0)
    with torch.no_grad():  # logits a few units apart, biases that matter
        m.model.embed_tokens.weight.mul_(20)
        m.lm_head.weight.mul_(30)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(generator=torch.Generator().manual_seed(1))
    return m.eval()


def _run(runner: ModelRunner, ids: torch.Tensor, prompt: int, steps: int, verify: int) -> list[torch.Tensor]:
    """Prefill ``prompt`` tokens into slot 1 of a 3-slot cache, decode ``steps`` tokens one at a time (several cache
    lengths S), then one verify pass of ``verify`` positions; every call's logits."""
    cache = runner.allocate_cache(3, 64)
    rows = torch.tensor([1])
    out = [runner.forward(ids[None, :prompt], torch.arange(prompt)[None], cache, rows)]
    for t in range(prompt, prompt + steps):
        out.append(runner.forward(ids[None, t:t + 1], torch.tensor([[t]]), cache, rows))
    start = prompt + steps
    out.append(runner.verify_logits(ids[None, start:start + verify], start, cache, 1))
    return out


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_step_matches_python_path(ext, quantize, family):
    model = _model(**FAMILIES[family])
    fused, python = ModelRunner(model, quantize=quantize), ModelRunner(model, quantize=quantize, fused=False)
    assert fused.fused is not None and python.fused is None
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(7))
    for verify in (1, 2, 9, 16):
        got, want = _run(fused, ids, 6, 12, verify), _run(python, ids, 6, 12, verify)
        assert got[-1].shape == want[-1].shape == (verify, 256)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == torch.float32
            assert float((a - b).abs().max()) <= TOL[quantize], (verify, float((a - b).abs().max()))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_verify_pass_equals_decode_steps_bit_for_bit(ext, quantize):
    model = _model(**FAMILIES["sliding"])
    r = ModelRunner(model, quantize=quantize)
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(3))
    steps = _run(r, ids, 8, 11, 1)[1:]  # 12 single-position steps at positions 8..19
    cache = r.allocate_cache(3, 64)
    r.forward(ids[None, :8], torch.arange(8)[None], cache, torch.tensor([2]))
    verify = r.verify_logits(ids[None, 8:20], 8, cache, 2)
    assert torch.equal(verify, torch.cat(steps))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_greedy_generation_is_token_for_token_equal(ext, quantize):
    model = _model()
    tokens = []
    for fused in (True, False):
        r = ModelRunner(model, quantize=quantize, fused=fused)
        cache = r.allocate_cache(1, 64)
        ids = list(range(5, 13))
        logits = r.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([0]))
        for _ in range(30):
            ids.append(int(logits[0].argmax()))
            logits = r.forward(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids) - 1]]), cache, torch.tensor([0]))
        tokens.append(ids)
    assert tokens[0] == tokens[1]
    assert len(set(tokens[0][8:])) > 3  # a continuation that varies


@pytest.mark.parametrize("fmt", ["float32", "q8", "q4"])
@pytest.mark.parametrize("M,N,K", [(1, 67, 96), (3, 130, 64), (12, 128, 64), (9, 33, 160), (16, 8, 32)])
def test_fused_linear_kernels(ext, fmt, M, N, K):
    """The fused step's matmuls: float32 against F.linear, q8/q4 bit for bit against the int8/int4 kernels (the same
    sums in the same order), every row as computed alone (batch-invariant); odd N and M exercise the edge tiles."""
    g = torch.Generator().manual_seed(M * N)
    w, x, bias = torch.randn(N, K, generator=g) * 0.1, torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    if fmt == "float32":
        lin = [w, None, None, None, bias]
        want = F.linear(x, w, bias)
        got = ext.fused_linear(x, lin)
        assert float((got - want).abs().max()) < 1e-5
    elif fmt == "q8":
        q, d = kernels.quantize_q8(w)
        lin = [None, q, d, None, None]
        got = ext.fused_linear(x, lin)
        assert torch.equal(got, ext.q8_matmul(x, q, d))
    else:
        q, d, m = kernels.quantize_q4(w)
        lin = [None, q, d, m, None]
        got = ext.fused_linear(x, lin)
        assert torch.equal(got, ext.q4_matmul(x, q, d, m))
    assert torch.equal(got, torch.cat([ext.fused_linear(x[i:i + 1].contiguous(), lin) for i in range(M)]))



def test_fused_float32_adds_each_output_lanes_in_one_fixed_order(ext):
    """With K = 8 each accumulator lane holds one product (rounded once, as float32 multiplication rounds it); the
    eight lanes are then added pairwise as (0+4 + 2+6) + (1+5 + 3+7), whatever the tile (one row: 8 outputs per
    tile; 2-16 rows: 4 outputs x up to 3 rows, summed four at a time), so decode rows, batches and verify passes agree
    bit for bit.  Products of mixed magnitudes make another order give other floats."""
    g = torch.Generator().manual_seed(5)
    for M in (1, 2, 3, 16):
        w = torch.randn(8, 8, generator=g) * 10.0 ** torch.randint(-3, 4, (8, 8), generator=g)
        x = torch.randn(M, 8, generator=g) * 10.0 ** torch.randint(-3, 4, (M, 8), generator=g)
        p = x[:, None, :] * w[None, :, :]  # [M, N, 8]
        want = (p[..., 0] + p[..., 4] + (p[..., 2] + p[..., 6])) + (p[..., 1] + p[..., 5] + (p[..., 3] + p[..., 7]))
        other = (p[..., 0] + p[..., 1] + (p[..., 2] + p[..., 3])) + (p[..., 4] + p[..., 5] + (p[..., 6] + p[..., 7]))
        assert not torch.equal(want, other)
        assert torch.equal(ext.fused_linear(x, [w, None, None, None, None]), want)

def _x8_weights(fmt: str, w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The reference output of ``x @ w.T`` in format ``fmt`` and the x8 weights as ``fused_linear`` takes them."""
    if fmt == "q8":
        q, d = kernels.quantize_q8(w)
        return kernels.q8_matmul_reference(x, q, d), [None, *kernels.pack_x8(q, d)[:2], None, None]
    q, d, m = kernels.quantize_q4(w)
    return kernels.q4_matmul_reference(x, q, d, m), [None, *kernels.pack_x8(q, d, m), None]


def _check_x8(ext, fmt: str, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The x8 kernel's output: within float-order rounding of the reference, and each row as computed alone."""
    want, lin = _x8_weights(fmt, w, x)
    got = ext.fused_linear(x, lin)
    bound = 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    assert bool(((got - want).abs() <= bound).all()), float((got - want).abs().max())
    assert torch.equal(got, torch.cat([ext.fused_linear(x[i:i + 1].contiguous(), lin) for i in range(len(x))]))
    return got


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("M,N,K", [(1, 64, 96), (3, 136, 64), (5, 16, 160), (16, 8, 32), (70, 24, 96)])
def test_fused_linear_x8_layout(ext, fmt, M, N, K):
    """The row-interleaved (x8) kernels against the pure-PyTorch reference of the format (int16 activations for q8,
    int8 for q4; float summation order only), every row as computed alone (batch-invariant)."""
    g = torch.Generator().manual_seed(M * N + K)
    w, x = torch.randn(N, K, generator=g) * 0.1, torch.randn(M, K, generator=g)
    w[0, :32] = 0.0  # an all-zero block
    _check_x8(ext, fmt, w, x)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_fused_linear_x8_integer_sums_are_exact_at_the_extremes(ext, fmt):
    """Weights and activations at the ends of their ranges (q8: +-127 x +-32767, q4: 0 or 15 x +-127, every product of
    a block the same sign), so a block's integer sums reach their largest values: the x8 kernels give what the
    reference gives (no overflow or saturation in any order of the integer adds), at 16 rows (decode) and 70 (prefill
    tiles), each row as computed alone."""
    g = torch.Generator().manual_seed(3)
    N, K = 16, 128
    w = torch.where(torch.rand(N, K, generator=g) < 0.5, -1.0, 1.0) * 0.05
    if fmt == "q8":
        assert int(kernels.quantize_q8(w)[0].abs().min()) == 127
    for M in (16, 70):
        sign = torch.where(torch.rand(M, 1, generator=g) < 0.5, -1.0, 1.0)
        x = (sign * 3.0 * torch.sign(w[M % N])).contiguous()  # all of row M % N's products of one sign
        got = _check_x8(ext, fmt, w, x)
        assert float(got.abs().max()) > 0.99 * K * 0.05 * 3.0  # the largest possible sum was reached


def test_long_verify_pass_takes_the_python_path(ext, monkeypatch):
    """More than FUSED_MAX_T positions: the Python path (the fused step is never called), same logits."""
    model = _model()
    r = ModelRunner(model)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5))
    want = _run(ModelRunner(model, fused=False), ids, 4, 0, 20)[-1]

    class Refuse:
        def step(self, *args):
            raise AssertionError("the fused step ran for 20 positions")

    monkeypatch.setattr(r, "fused", Refuse())
    got = _run(r, ids, 4, 0, 20)[-1]
    assert float((got - want).abs().max()) <= 1e-4


def test_unsupported_models_keep_the_python_path_with_one_log_line(ext, caplog):
    with caplog.at_level(logging.INFO, logger="lmforge.serve"):
        gemma = ModelRunner(_model(gemma_norms=True, hidden_act="gelu_pytorch_tanh"))
        bf16 = ModelRunner(_model(), dtype="bfloat16")
        ok = ModelRunner(_model())
    assert gemma.fused is None and bf16.fused is None and ok.fused is not None
    lines = [r.getMessage() for r in caplog.records if "single-stream decode" in r.getMessage()]
    assert len(lines) == 3
    assert "Gemma norms" in lines[0] and "bfloat16" in lines[1] and "fused C++ step" in lines[2]


def test_no_extension_falls_back_with_the_same_results(monkeypatch, caplog):
    """LMFORGE_KERNELS=0 (or no compiler): the Python path, one log line saying why, the same logits as ``fused=False``
    (here: the same code)."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    model = _model()
    with caplog.at_level(logging.INFO, logger="lmforge.serve"):
        r = ModelRunner(model)
    assert r.fused is None
    assert [m for m in (x.getMessage() for x in caplog.records) if "single-stream decode" in m] == [
        "single-stream decode: the Python path (the C++ extension is unavailable)"]
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2))
    got, want = _run(r, ids, 6, 4, 5), _run(ModelRunner(model, fused=False), ids, 6, 4, 5)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
