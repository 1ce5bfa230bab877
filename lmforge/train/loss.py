"""Fused, chunked linear + cross-entropy: the language-model head and its loss without the full logits tensor.

The plain way to compute the next-token loss,

    loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)

materialises ``[tokens, vocab]`` logits (in the autocast dtype), a float32 copy of them, their log-softmax and, in the
backward pass, a gradient of the same size: several passes over a tensor that for 16 x 256 tokens and a 4096-word
vocabulary is 64 MB per float32 copy.  On a CPU these passes are bound by memory bandwidth.

``linear_cross_entropy`` walks the rows in chunks of ``chunk_size`` tokens.  For each chunk it computes the logits,
their log-sum-exp and the loss, and -- because the gradient of cross-entropy with respect to the logits is simply
``softmax(logits) - one_hot(target)`` -- it computes the gradients of the hidden states and of the head weight right
away, while the chunk's logits are still in cache.  Only ``[chunk, vocab]`` logits ever exist; the backward pass just
scales the stored gradients by the incoming gradient of the loss.

Numerics follow the plain path: the matmuls run in the autocast dtype when autocast is on (bfloat16 logits), the
softmax and loss in float32, the logits' gradient is rounded to the matmul dtype like autocast's backward does.  The
head-weight gradient is summed over chunks in float32.  The loss is the mean over targets that are not
``ignore_index`` (NaN when there are none, like ``F.cross_entropy``).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, compute_dtype: torch.dtype) -> torch.Tensor:
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        valid = targets != ignore_index
        count = valid.sum()
        safe_targets = targets.masked_fill(~valid, 0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc, yc, vc = h[rows], safe_targets[rows], valid[rows]
            logits = (hc @ w.t()).float()  # [chunk, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, yc[:, None]).squeeze(1)
            total += ((lse - target_logit) * vc).sum()
            if need_h or need_w:
                # d(sum of losses)/d(logits) = softmax - one_hot(target); rows with an ignored target contribute 0
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -1.0))
                grad.mul_(vc[:, None])
                grad = grad.to(compute_dtype)
                if need_h:
                    torch.mm(grad, w, out=grad_h[rows])
                if need_w:
                    grad_w += grad.t() @ hc
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * scale).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding all the logits at once.

    ``hidden`` [..., hidden_size] (e.g. the final-norm output of ``Llama.forward(..., return_hidden=True)``),
    ``weight`` [vocab, hidden_size] (``model.lm_head.weight``), ``targets`` [...] of token ids.  Equals
    ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)``
    in value and gradients, also under ``torch.autocast``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the token dims")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                         ignore_index, chunk_size, compute_dtype)


def _chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # [chunk, vocab], in the autocast dtype before the cast like F.linear
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Log-probability of each target under ``softmax(hidden @ weight.T)``, [N] for ``hidden`` [N, hidden_size] and
    ``targets`` [N], never holding more than ``[chunk_size, vocab]`` logits.

    The per-token counterpart of ``linear_cross_entropy`` for losses that weight tokens differently (DPO's summed
    log-probs per sequence): each chunk runs under activation checkpointing, so only its inputs are kept for the
    backward pass, which recomputes the chunk's logits.  Equals
    ``F.log_softmax(F.linear(hidden, weight).float(), -1).gather(1, targets[:, None]).squeeze(1)`` in value and
    gradients (also under ``torch.autocast``).  Select the tokens that count first: every row costs a head matmul.
    """
    from torch.utils.checkpoint import checkpoint

    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, hidden] and targets {tuple(targets.shape)} [N]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if needs_grad:
            parts.append(checkpoint(_chunk_log_probs, hidden[rows], weight, targets[rows], use_reentrant=False))
        else:
            parts.append(_chunk_log_probs(hidden[rows], weight, targets[rows]))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def logit_softcap(model: torch.nn.Module) -> float | None:
    """Gemma-style final logit soft-capping of a ``Llama`` (or a DDP / peft wrapper around one), else None: the
    chunked head skips it, so such models take the full-logits path."""
    m = getattr(model, "module", model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    return getattr(getattr(m, "config", None), "final_logit_softcapping", None)


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output head's weight of a ``Llama`` or of a peft model around one."""
    llama = model.get_base_model() if hasattr(model, "get_base_model") else model
    return llama.lm_head.weight
