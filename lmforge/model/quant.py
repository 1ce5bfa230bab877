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

__all__ = ["quantize_weight_int8", "int8_linear", "Int8Linear", "quantize_llama_int8", "perplexity"]


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
