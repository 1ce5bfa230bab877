"""Block-quantised weight formats for CPU serving, with a C++/AVX2 kernel and a pure-PyTorch reference.

Two formats, both in blocks of 32 inputs per output row (llama.cpp's q8_0 and q4_1 layouts, float16 scales):

* ``q8``: int8 ``q`` [N, K] and a scale ``d`` [N, K/32]; ``w = d * q``.  One scale per 32 weights instead of one per
  row keeps SmolLM2's outlier rows from costing the whole row its precision.
* ``q4``: 4-bit ``q`` packed two per byte [N, K/2] (byte j of a block holds elements j and j + 16), a scale ``d`` and a
  minimum ``m`` [N, K/32]; ``w = d * q + m``, q in 0..15.

A matmul quantises its activation rows per block of 32 (``xd = max|x| / A``), to int16 (A = 32767) against q8
weights and to int8 (A = 127, as llama.cpp) against q4 weights (int8 activations gave SmolLM2's int8 weights +0.59 %
perplexity instead of +0.20 %, over issue 21's 0.5 %; int4 has a 1 % budget and its int8 x uint8 products are the
cheap ones on AVX2), takes exact integer dot products per block and sums them in float32 weighted by the two scales
(``qmatmul.cpp`` says how).

Weights whose row count is a multiple of 8 are stored for the kernels in a row-interleaved layout (``pack_x8``: 8
output rows per group, one row per 32-bit vector lane; ``fused_step.cpp`` multiplies it 8 rows per pass); the
row-major layout above stays the definition of the format (``unpack_x8`` gives it back).  The extension is
built with the system's C++ compiler on first use (``torch.utils.cpp_extension``, cached on disk under
``$LMFORGE_KERNELS_DIR`` or ``~/.cache/lmforge/kernels``; ``python -m lmforge.serve.kernels build`` does it at install
time).  Where it cannot be built (no compiler, a CPU without AVX2, not x86, ``LMFORGE_KERNELS=0``) the same
numerics run in pure PyTorch (``*_reference``: dequantised weights and activations, one float matmul) after one log
line; the reference differs from the kernel only in the order of float additions.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

QK = 32  # inputs per block
ACT_MAX = 32767  # activations against q8 weights are quantised to int16 per block: xq in -32767..32767
ACT_MAX_Q4 = 127  # ... against q4 weights to int8: xq in -127..127
log = logging.getLogger("lmforge.serve")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the loaded extension or None once tried

__all__ = ["QK", "quantize_q8", "quantize_q4", "dequantize_q8", "dequantize_q4", "quantize_activations_reference",
           "q8_matmul_reference", "q4_matmul_reference", "pack_x8", "unpack_x8", "load", "available", "build_dir"]


# -- formats ------------------------------------------------------------------------------------------------------------
def _blocks(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    if k % QK:
        raise ValueError(f"block quantisation: input size {k} is not a multiple of {QK}")
    return weight.detach().float().reshape(n, k // QK, QK)


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [N, K], d float16 [N, K/32])`` with ``weight ≈ d * q`` per block of 32 (q from the stored float16
    scale, so the rounding of ``d`` is part of what the quantisation minimises)."""
    w = _blocks(weight)
    d = (w.abs().amax(-1) / 127.0).half()
    df = d.float()[..., None]
    q = (w / df).round_().clamp_(-127, 127)  # in place: this runs on every weight sync of int8 GRPO rollouts
    zero = df == 0
    if bool(zero.any()):  # an all-zero block (or one whose scale rounds to 0 in float16): q = 0
        q.masked_fill_(zero, 0.0)
    return q.to(torch.int8).reshape(weight.shape).contiguous(), d.contiguous()


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed uint8 [N, K/2], d float16 [N, K/32], m float16 [N, K/32])`` with ``weight ≈ d * q + m``, q in 0..15
    per block of 32 (asymmetric: the block's minimum and range)."""
    w = _blocks(weight)
    lo, hi = w.amin(-1), w.amax(-1)
    d, m = ((hi - lo) / 15.0).half(), lo.half()
    df, mf = d.float()[..., None], m.float()[..., None]
    q = torch.where(df > 0, torch.round((w - mf) / df), 0.0).clamp(0, 15).to(torch.uint8)
    packed = q[..., :QK // 2] | (q[..., QK // 2:] << 4)
    return packed.reshape(weight.shape[0], -1).contiguous(), d.contiguous(), m.contiguous()


def dequantize_q8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.float().reshape(n, k // QK, QK) * d.float()[..., None]).reshape(n, k)


def dequantize_q4(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    p = packed.reshape(n, -1, QK // 2)
    q = torch.cat([p & 0x0F, p >> 4], dim=-1).float()
    return (q * d.float()[..., None] + m.float()[..., None]).reshape(n, -1)


def quantize_activations_reference(x: torch.Tensor, act_max: int = ACT_MAX
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq int16 [M, K], xd [M, K/32], xs [M, K/32])``: what the kernel quantises float32 rows ``x`` [M, K] to
    (``xd = max|x| / act_max``, ``xq = round(x * (1 / xd))``, ``xs = xd * sum(xq)`` per block); ``act_max``:
    ``ACT_MAX`` (int16, against q8 weights) or ``ACT_MAX_Q4`` (int8, against q4 weights)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // QK, QK)
    d = xb.abs().amax(-1) / act_max
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-act_max, act_max)
    return q.to(torch.int16).reshape(M, K), d, d * q.sum(-1)


def _fake_quant_activations(x: torch.Tensor, act_max: int) -> torch.Tensor:
    q, d, _ = quantize_activations_reference(x, act_max)
    M, K = x.shape
    return (q.float().reshape(M, K // QK, QK) * d[..., None]).reshape(M, K)


def q8_matmul_reference(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` with the kernel's numerics in PyTorch; ``weight``: ``dequantize_q8(q, d)`` if precomputed."""
    return F.linear(_fake_quant_activations(x, ACT_MAX), dequantize_q8(q, d) if weight is None else weight)


def q4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """The same for q4 weights (int8 activations); ``weight``: ``dequantize_q4(packed, d, m)`` if precomputed."""
    return F.linear(_fake_quant_activations(x, ACT_MAX_Q4), dequantize_q4(packed, d, m) if weight is None else weight)


# -- the row-interleaved layout (x8) ------------------------------------------------------------------------------------
# Output rows in groups of 8; block b of group g is stored contiguously with one row per 32-bit lane of a 256-bit
# vector: q4 as 4 runs of 32 bytes (run j: bytes 4j..4j+3 of each of the 8 rows' 16-byte block, row 0 first), q8 as
# 16 runs of 16 bytes (run i: elements 2i, 2i+1 of each row); the scales (and minima) of the 8 rows as [G, B, 8].
def pack_x8(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-major q8 ``(q [N, K], d)`` or q4 ``(packed [N, K/2], d, m)`` -> the x8 layout ``(q [N/8, K/32, 256 or 128],
    d [N/8, K/32, 8], m)``; N must be a multiple of 8."""
    n, b = d.shape
    if n % 8:
        raise ValueError(f"the x8 layout needs a multiple of 8 rows, got {n}")
    g = n // 8
    # a run (2 bytes of q8, 4 of q4) moves as one int16 / int32: the permutation copies whole runs, not bytes
    word = torch.int32 if m is not None else torch.int16
    runs = q.contiguous().view(word).reshape(g, 8, b, -1).permute(0, 2, 3, 1)
    def scales(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(g, 8, b).permute(0, 2, 1).contiguous()

    return runs.contiguous().view(q.dtype).reshape(g, b, -1), scales(d), None if m is None else scales(m)


def unpack_x8(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of ``pack_x8``: the row-major layout."""
    g, b, nbytes = q.shape
    word = torch.int32 if m is not None else torch.int16
    runs = q.contiguous().view(word).reshape(g, b, -1, 8).permute(0, 3, 1, 2)
    def scales(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 1).reshape(8 * g, b).contiguous()

    return runs.contiguous().view(q.dtype).reshape(8 * g, b * nbytes // 8), scales(d), None if m is None else scales(m)


# -- the extension ------------------------------------------------------------------------------------------------------
SOURCE = Path(__file__).with_name("qmatmul.cpp")
SOURCES = [SOURCE, SOURCE.with_name("fused_step.cpp")]  # one extension: the matmuls and the fused decode step
# no contraction of a * b + c into one FMA: GCC would contract some tile shapes and not others, and a verify pass
# must sum every output exactly as a decode step does (kernels use explicit FMA intrinsics where they want one)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]


def build_dir() -> Path:
    base = os.environ.get("LMFORGE_KERNELS_DIR") or Path.home() / ".cache" / "lmforge" / "kernels"
    return Path(base) / f"torch{torch.__version__}-py{platform.python_version()}"


def _why_not() -> str | None:
    """Why this machine cannot run the AVX2 kernel, or None."""
    if os.environ.get("LMFORGE_KERNELS", "1") == "0":
        return "LMFORGE_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) puts it next to the
    venv's python, which is not on PATH when lmforge is run as ``.venv/bin/lmforge``."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension (built on first call, then loaded from the on-disk cache), or None after one log line
    saying why the pure-PyTorch reference runs instead."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module, why = None, _why_not()
        if why is None:
            try:
                from torch.utils import cpp_extension

                _ninja_on_path()
                path = build_dir()
                path.mkdir(parents=True, exist_ok=True)
                log.info("loading the int8/int4 matmul kernel from %s (compiled there on first use: a minute or more)",
                         path)
                module = cpp_extension.load("lmforge_qmatmul", [str(s) for s in SOURCES], extra_cflags=FLAGS,
                                            extra_ldflags=["-fopenmp"], build_directory=str(path), verbose=verbose)
            except Exception as err:  # no compiler, no ninja, a build error: the reference path, never a crash
                lines = str(err).strip().splitlines() or [""]
                why = f"the build failed: {type(err).__name__}: {lines[-1][:200]}"
        if module is None:
            log.warning("block-quantised matmul kernel unavailable (%s); using the pure-PyTorch reference "
                        "(same numerics, float32 speed and memory)", why)
        _state["module"] = module
        return module


def available() -> bool:
    return load() is not None
