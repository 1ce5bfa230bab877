"""QLoRA-style training on a CPU: the frozen base weights stored as int8, the LoRA adapters in float32.

QLoRA (Dettmers et al. 2023) keeps the frozen base in 4-bit NF4 and trains float adapters on top.  Its kernels come
from ``bitsandbytes``, which quantises and multiplies NF4 on CUDA GPUs only, so on a CPU we do what is honest and
portable: every frozen ``nn.Linear`` inside the decoder layers (the ``base_layer`` of each LoRA-wrapped projection,
and the projections without adapters) keeps its weight as int8 with one float scale per output channel
(``lmforge.model.quant.quantize_weight_int8``, weight-only, symmetric).  That stores those weights in a quarter of
the float32 bytes.  The forward and backward passes dequantise one layer's weight at a time (a transient float32 copy of
one matrix), because PyTorch's fused int8 CPU matmul is built for decode-sized inputs and is much slower than a
float matmul on training-sized batches.  The embeddings, norms and ``lm_head`` (tied to the embeddings in SmolLM2)
stay float32.

The adapters train against the quantised base; ``lmforge merge`` folds them into the original float32 base (the
QLoRA convention), so the merged model differs from the quantised adapter model by the int8 rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.quant import quantize_weight_int8


class _DequantLinear(torch.autograd.Function):
    """``y = x @ (q * scale).T + bias`` with a gradient for ``x`` only (the base is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        w = q.to(x.dtype) * scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, scale = ctx.saved_tensors
        w = q.to(grad_out.dtype) * scale.to(grad_out.dtype)[:, None]
        return grad_out @ w, None, None, None


class FrozenInt8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is int8 per-output-channel; differentiable with respect to its input."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_weight_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (peft reads ``base_layer.weight`` for its dtype and shape)."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_frozen_base(model: nn.Module) -> dict[str, int]:
    """Swap every frozen ``nn.Linear`` inside the decoder layers of a (LoRA-wrapped) model for a ``FrozenInt8Linear``,
    in place.  Returns ``{"quantized_linears", "base_bytes_before", "base_bytes_after"}`` for those weights."""
    count, before, after = 0, 0, 0
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}." or "lora_" in name:
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad and not child_name.startswith("lora_"):
                quantized = FrozenInt8Linear(child)
                setattr(module, child_name, quantized)
                count += 1
                before += child.weight.numel() * child.weight.element_size()
                after += quantized.qweight.numel() + quantized.scale.numel() * quantized.scale.element_size()
    if not count:
        raise ValueError("no frozen linear layer found to quantise (is the model wrapped with LoRA adapters?)")
    return {"quantized_linears": count, "base_bytes_before": before, "base_bytes_after": after}


def model_state_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
