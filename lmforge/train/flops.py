"""Model FLOPs utilisation (MFU): achieved training FLOPs / the device's peak FLOPs.

Training FLOPs per token follow the PaLM appendix-B count: ``6 N`` for the matrix multiplies of forward + backward over
the ``N`` non-embedding-lookup parameters, plus ``12 L H T`` for attention scores and values (``L`` layers, width
``H``, context ``T``).

Peak FLOPs come from a per-device table of dense (no sparsity) vendor figures.  A CPU has no datasheet number, so its
peak is computed as ``cores × clock × FLOPs/cycle/core``, with FLOPs/cycle from the instruction sets the CPU reports
(two FMA units per core: AVX-512 → 64 fp32, AVX2 → 32 fp32; AMX-BF16 → 1024 bf16, AVX512-BF16 → 128 bf16) and the
clock from ``/proc/cpuinfo`` (``cpu MHz``).  ``LMFORGE_PEAK_FLOPS`` overrides the table for any device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge.model.llama import LlamaConfig

# dense peak TFLOP/s by (device-name fragment, dtype); first match wins, so longer names come first
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 31.2}),
    ("RTX 4090", {"bfloat16": 165.0, "float16": 165.0, "float32": 82.6}),
    ("RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
]


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token."""
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    # the embedding lookup is not a matmul, the (tied or not) output head is: count the head once
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * n + attention


def _cpu_info() -> tuple[set[str], float]:
    flags: set[str] = set()
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    return flags, mhz or 2000.0


def cpu_peak_flops(dtype: str = "float32", threads: int | None = None) -> float:
    """Peak FLOP/s of the CPU threads torch uses: cores × clock × FLOPs/cycle/core (see the module docstring)."""
    flags, mhz = _cpu_info()
    if dtype == "bfloat16" and "amx_bf16" in flags:
        per_cycle = 1024
    elif dtype == "bfloat16" and "avx512_bf16" in flags:
        per_cycle = 128
    elif "avx512f" in flags:
        per_cycle = 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    else:
        per_cycle = 8
    cores = threads or torch.get_num_threads()
    return cores * mhz * 1e6 * per_cycle


def peak_flops(device: torch.device, dtype: str = "float32") -> tuple[float, str]:
    """``(peak FLOP/s, device description)`` for one device; the env var ``LMFORGE_PEAK_FLOPS`` overrides it."""
    override = os.environ.get("LMFORGE_PEAK_FLOPS")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = 0.0
        for fragment, table in GPU_PEAK_TFLOPS:
            if fragment in name:
                peak = table.get(dtype, table["float32"]) * 1e12
                break
    else:
        name = f"CPU x{torch.get_num_threads()} threads"
        peak = cpu_peak_flops(dtype)
    if override:
        peak = float(override)
    return peak, name


def mfu(tokens_per_s: float, flops_token: float, peak: float) -> float:
    """Fraction of peak FLOP/s achieved (0 when the peak is unknown)."""
    return tokens_per_s * flops_token / peak if peak > 0 else 0.0
