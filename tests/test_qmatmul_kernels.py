"""The block-quantised int8/int4 matmul kernels (``lmforge.serve.kernels``): the C++/AVX2 extension against the
pure-PyTorch reference of the same format (activation quantisation bit-exact, matmuls within float-summation-order
error), the formats' rounding error, the runner's int8/int4 paths with and without the extension, and the fallback
when the extension cannot be built (one log line, never a crash)."""

from __future__ import annotations

import os
import logging

import pytest
import torch

from lmforge.model.llama import Llama, LlamaConfig
from lmforge.serve import kernels
from lmforge.serve.runner import ModelRunner


@pytest.fixture(scope="module")
def ext():
    module = kernels.load()
    if module is None:
        pytest.skip("the C++ kernel cannot be built here (the reference path is tested below)")
    return module


@pytest.fixture
def no_kernel(monkeypatch):
    """Forget any loaded extension for this test and forbid it (restored afterwards)."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LMFORGE_KERNELS", "0")


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    w[1, 5] = 3.0  # an outlier: only its own block's precision suffers
    return w


@pytest.mark.parametrize("act_max", [kernels.ACT_MAX, kernels.ACT_MAX_Q4])
@pytest.mark.parametrize("M", [1, 3, 40])
def test_activation_quantisation_is_bit_exact(ext, M, act_max):
    x = torch.randn(M, 96, generator=torch.Generator().manual_seed(M)) * 4
    x[0, :32] = 0.0
    x[-1, 40] = 1e4  # an outlier
    got, want = ext.quantize_activations(x, act_max), kernels.quantize_activations_reference(x, act_max)
    assert got[0].dtype == torch.int16 and int(got[0].abs().max()) == act_max
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("M,N,K", [(1, 200, 96), (5, 67, 160), (33, 130, 64)])
def test_kernel_matches_reference(ext, fmt, M, N, K):
    w = _weights(N, K, seed=N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    if fmt == "q8":
        q, d = kernels.quantize_q8(w)
        got, want = ext.q8_matmul(x, q, d), kernels.q8_matmul_reference(x, q, d)
    else:
        q, d, m = kernels.quantize_q4(w)
        got, want = ext.q4_matmul(x, q, d, m), kernels.q4_matmul_reference(x, q, d, m)
    # the same products, summed in another order: float32 rounding only
    bound = 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    assert bool(((got - want).abs() <= bound).all()), float((got - want).abs().max())
    # batch-invariant: each row as computed alone
    single = torch.cat([ext.q8_matmul(x[i:i + 1], q, d) if fmt == "q8" else ext.q4_matmul(x[i:i + 1], q, d, m)
                        for i in range(M)])
    assert torch.equal(got, single)


def test_kernel_rejects_bad_shapes(ext):
    q, d = kernels.quantize_q8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="columns"):
        ext.q8_matmul(torch.randn(1, 32), q, d)
    with pytest.raises(RuntimeError, match="float32"):
        ext.q8_matmul(torch.randn(1, 64).double(), q, d)


def test_formats_round_to_half_a_step():
    w = _weights(16, 128, seed=1)
    q, d = kernels.quantize_q8(w)
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (16, 4)
    step = d.float().repeat_interleave(32, dim=1)
    assert bool(((kernels.dequantize_q8(q, d) - w).abs() <= step / 2 + 1e-7).all())
    p, d4, m4 = kernels.quantize_q4(w)
    assert p.dtype == torch.uint8 and p.shape == (16, 64) and m4.shape == (16, 4)
    step4 = d4.float().repeat_interleave(32, dim=1)
    # half a step, plus the float16 rounding of the minimum
    err = (kernels.dequantize_q4(p, d4, m4) - w).abs()
    assert bool((err <= step4 / 2 + m4.float().abs().repeat_interleave(32, dim=1) * 1e-3 + 1e-7).all())
    assert float((kernels.dequantize_q8(q, d)[1] - w[1]).abs()[64:].max()) < 0.01  # the outlier's block only
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quantize_q8(torch.randn(4, 40))


@pytest.fixture(scope="module")
def model() -> Llama:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = Llama(cfg)
    m.init_weights(seed=0)
    return m.eval()


def _logits(runner: ModelRunner) -> torch.Tensor:
    ids = torch.arange(3, 19)[None]
    cache = runner.allocate_cache(1, 32)
    first = runner.forward(ids[:, :12], torch.arange(12)[None], cache, torch.tensor([0]))
    steps = [runner.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache, torch.tensor([0])) for t in range(12, 16)]
    return torch.cat([first, *steps])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_runner_kernel_equals_reference_path(ext, model, quantize, no_kernel, caplog):
    """The runner with the extension and without it (forced off: dequantised float32 weights) compute the same."""
    kernels._state["module"] = ext
    fast = ModelRunner(model, "float32", quantize)
    assert fast.layers[0].qkv.kernel is ext and fast.layers[0].qkv.weight is None
    want = _logits(fast)
    kernels._state.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge.serve"):
        slow = ModelRunner(model, "float32", quantize)
    assert slow.layers[0].qkv.kernel is None and slow.layers[0].qkv.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(slow), want, rtol=1e-4, atol=1e-4)


def test_no_compiler_falls_back_with_one_log_line(model, no_kernel, tmp_path, monkeypatch, caplog):
    """A build that fails (here: no C++ compiler, nothing cached) logs once and serves through the reference."""
    monkeypatch.setenv("LMFORGE_KERNELS", "1")
    monkeypatch.setenv("LMFORGE_KERNELS_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with caplog.at_level(logging.WARNING, logger="lmforge.serve"):
        runner = ModelRunner(model, "float32", "int8")
        logits = _logits(runner)
    lines = [r for r in caplog.records if "kernel unavailable" in r.getMessage()]
    assert len(lines) == 1 and "reference" in lines[0].getMessage(), lines
    assert runner.lm_head.kernel is None
    with torch.no_grad():
        ref = model(torch.arange(3, 19)[None])[0, 11:16]
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
    assert float((p.exp() * (p - q)).sum(-1).max()) < 0.01


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_prefill_rows_take_the_dense_path_and_decode_batches_the_few_row_kernel(ext, monkeypatch, fmt):
    """Row-major weights (a row count not a multiple of 8): from ``DENSE_ROWS`` rows a quantised matmul dequantises
    (C++) and runs a dense float32 matmul, the same values as the kernel row by row; below it a batch of rows runs the
    fused step's few-row kernel, each row bit for bit what the one-row kernel gives it.  x8 weights run their kernel
    at any row count: every row bit for bit as computed alone."""
    from lmforge.serve import runner as runner_mod
    from lmforge.serve.runner import _Linear

    w = _weights(36, 64, seed=8)
    rowmajor, x8 = _Linear(w, None, torch.float32, fmt), _Linear(w[:32], None, torch.float32, fmt)
    assert not rowmajor.x8 and x8.x8
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(runner_mod, "DENSE_ROWS", 4)
    for lin in (rowmajor, x8):
        one_by_one = torch.cat([lin(x[i:i + 1]) for i in range(6)])
        monkeypatch.setattr(runner_mod, "DENSE_ROWS", 64)
        assert torch.equal(lin(x), one_by_one)
        monkeypatch.setattr(runner_mod, "DENSE_ROWS", 4)
        many = lin(x)
        torch.testing.assert_close(many, one_by_one, rtol=1e-5, atol=1e-5)
        assert torch.equal(many, one_by_one) == lin.x8  # only the row-major one took the dense path
    q, d, m = rowmajor.q, rowmajor.d, rowmajor.m
    assert torch.equal(ext.dequantize(q, d, m), kernels.dequantize_q4(q, d, m) if m is not None
                       else kernels.dequantize_q8(q, d))


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_x8_layout_is_a_permutation_with_one_row_per_lane(fmt):
    """``pack_x8``: block b of group g holds, in 32-bit lane r of each 256-bit run, row 8g + r's weights (q4: bytes
    4j..4j+3 of its block in run j; q8: elements 2i, 2i+1 in run i of 16 bytes); ``unpack_x8`` inverts it."""
    w = _weights(24, 96, seed=3)
    rowmajor = kernels.quantize_q8(w) + (None,) if fmt == "q8" else kernels.quantize_q4(w)
    q, d, m = kernels.pack_x8(*rowmajor)
    assert q.shape == (3, 3, 256 if fmt == "q8" else 128) and d.shape == (3, 3, 8)
    assert torch.equal(d[1, 2], rowmajor[1][8:16, 2])
    if fmt == "q4":
        assert torch.equal(m[2, 0], rowmajor[2][16:24, 0])
        assert torch.equal(q[1, 2, 32 + 4 * 3:32 + 4 * 4], rowmajor[0][8 + 3, 2 * 16 + 4:2 * 16 + 8])  # run 1, row 3
    else:
        assert torch.equal(q[1, 2, 16 * 5 + 2 * 3:16 * 5 + 2 * 4], rowmajor[0][8 + 3, 64 + 10:64 + 12])  # run 5, row 3
    for a, b in zip(kernels.unpack_x8(q, d, m), rowmajor, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.pack_x8(*(kernels.quantize_q8(w[:20]) + (None,)))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_runner_stores_x8_where_rows_allow_and_updates_rows_in_place(ext, fmt):
    """Linears with a multiple of 8 rows are stored x8 (the others row-major), and overwriting some rows (weight
    updates) leaves exactly what a fresh quantisation of the whole matrix gives, in the same tensors."""
    from lmforge.serve.runner import _Linear

    w = _weights(40, 64, seed=5)
    lin, odd = _Linear(w, None, torch.float32, fmt), _Linear(w[:36], None, torch.float32, fmt)
    assert lin.x8 and lin.q.dim() == 3 and not odd.x8 and odd.q.dim() == 2
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    ref = kernels.q8_matmul_reference if fmt == "int8" else kernels.q4_matmul_reference
    for l in (lin, odd):
        bound = 1e-5 * (x.abs() @ w[:l.rowmajor()[0].shape[0]].abs().T) + 1e-6
        assert bool(((l(x) - ref(x, *[t for t in l.rowmajor() if t is not None])).abs() <= bound).all())
    ptr = lin.q.data_ptr()
    new = _weights(13, 64, seed=6)
    lin.set_rows(5, new)  # rows 5..17: three groups of 8, partly
    w2 = w.clone()
    w2[5:18] = new
    fresh = _Linear(w2, None, torch.float32, fmt)
    assert lin.q.data_ptr() == ptr
    for a, b in zip(lin.tensors(), fresh.tensors(), strict=True):
        assert torch.equal(a, b)


def test_the_ninja_wheel_is_found_when_ninja_is_not_on_path(monkeypatch):
    """`.venv/bin/lmforge` runs without the venv on PATH: the build still finds the ninja wheel's binary."""
    import shutil

    import ninja

    from lmforge.serve import kernels

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    kernels._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
