"""What the machine computes fast: the one place that decides ``dtype: auto``.

bfloat16 autocast pays off only where the hardware computes it natively: a CUDA GPU that supports it, or a CPU with
AVX-512-BF16 or AMX. Elsewhere (AVX2-only x86, most laptops) PyTorch emulates bf16 by converting to float32 around
each kernel, and a training step or an attention call gets several times *slower* than in float32
(docs/benchmarks.md, "bfloat16 on a CPU without native bf16").
"""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512-BF16 or AMX), so bf16 elementwise ops and attention are
    not slower than float32 ones."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_dtype(device: torch.device) -> str:
    """``"bfloat16"`` where ``device`` computes it natively, else ``"float32"``."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16() else "float32"


def resolve_dtype(name: str, device: torch.device) -> tuple[str, str]:
    """A config's ``dtype`` (``float32`` / ``bfloat16`` / ``auto``) → ``(dtype name, why)``; ``why`` is empty unless
    ``auto`` decided."""
    if name != "auto":
        return name, ""
    chosen = auto_dtype(device)
    if device.type == "cuda":
        why = f"auto: {torch.cuda.get_device_name(device)}" + ("" if chosen == "bfloat16" else " has no bf16")
    elif chosen == "bfloat16":
        why = "auto: this CPU computes bf16 natively (AVX-512-BF16/AMX)"
    else:
        why = "auto: this CPU has no native bf16 (no AVX-512-BF16/AMX), where bf16 is emulated and slower"
    return chosen, why
