"""Int8 weight-only quantisation (symmetric, one scale per output channel) for CPU serving.

Weights are stored as int8 with a float scale per output row: ``w ≈ q * scale[:, None]`` where
``scale = max|w_row| / 127``.  Activations stay bf16/float; the matmul is PyTorch's fused
``torch._weight_int8pack_mm`` on CPU (it reads a quarter of the float32 bytes, which is what bounds a decode step),
or a dequantise-then-matmul elsewhere.

``quantize_llama_int8(model)`` swaps every ``nn.Linear`` of a ``Llama`` (attention, MLP, ``lm_head``) for an
``Int8Linear`` in place, so the ordinary forward (and so perplexity) runs on the quantised weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["quantize_weight_int8", "int8_linear", "Int8Linear", "quantize_llama_int8", "quantize_weight_int4",
           "int4_linear", "Int4Linear", "quantize_llama_int4", "perplexity"]


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 [out, in] and float32 [out] with ``weight ≈ q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale).T + bias`` for x [..., in]; ``scale`` must have ``x``'s dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.is_cpu and hasattr(torch, "_weight_int8pack_mm"):
        y = torch._weight_int8pack_mm(x2.contiguous(), q, scale)
    else:
        y = F.linear(x2, q.to(x2.dtype) * scale[:, None])
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` with int8 per-channel weights; computes in ``dtype`` (bf16 is fastest on CPU)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        q, scale = quantize_weight_int8(linear.weight)
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x.to(self.dtype), self.qweight, self.scale, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


def quantize_llama_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every ``nn.Linear`` under ``model`` with an ``Int8Linear`` (in place); returns ``model``."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child, dtype))
    return model


def quantize_weight_int4(weight: torch.Tensor, group_size: int = 32,
                         dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scales_and_zeros)`` for ``torch._weight_int4pack_mm_for_cpu``: asymmetric 4-bit, one scale and
    zero per ``group_size`` inputs of each output row, ``w ≈ (q - 8) * scale + zero`` with q in 0..15.  Half the bytes
    of int8, which is what bounds a single-stream decode step on CPU."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4: input size {k} is not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-8) / 15
    q = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_zeros = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(dtype)  # [k/g, n, 2]
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for 4-bit weights from ``quantize_weight_int4`` (CPU); ``x`` must have the scales' dtype."""
    shape = x.shape
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).contiguous(), packed, group_size, scales_zeros)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


class Int4Linear(nn.Module):
    """A drop-in for ``nn.Linear`` with 4-bit group-wise weights (CPU only); computes in ``dtype``."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        packed, sz = quantize_weight_int4(linear.weight, group_size, dtype)
        self.in_features, self.out_features, self.group_size, self.dtype = (
            linear.in_features, linear.out_features, group_size, dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", sz)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x.to(self.dtype), self.packed, self.scales_zeros, self.group_size, self.bias).to(x.dtype)


def quantize_llama_int4(model: nn.Module, group_size: int = 32, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every ``nn.Linear`` under ``model`` with an ``Int4Linear`` (in place), except the output head
    (``lm_head``), which becomes an ``Int8Linear``: 4-bit logits are where almost all of int4's quality loss comes from
    (SmolLM2-135M: +6.9% perplexity with an int4 head, +0.05% with an int8 one).  Returns ``model``."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = Int8Linear(child, dtype) if child_name == "lm_head" else Int4Linear(child, group_size, dtype)
                setattr(module, child_name, q)
    return model


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of ``model`` on a 1-D token tensor, over non-overlapping windows of ``window`` tokens (the quality
    check for quantised weights: compare with the float model on held-out text)."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).float()
        total += float(F.cross_entropy(logits[0], chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))
