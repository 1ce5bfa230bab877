"""The grammar as a logits processor: one instance per request, applied to that request's row of the batch.

The engine calls a processor with the request's output so far and its next-token logits (sampling.py).  This one
first feeds the matcher the tokens sampled since its last call (the engine appended them), then masks every token the
grammar does not allow to -inf.  Once the grammar is complete the mask allows the eos token(s) (with any other
continuation the grammar still permits); once it has terminated, or if the matcher ever rejected a sampled token, only
eos is left, so the engine finishes the request with ``finish_reason="stop"`` through its ordinary eos check.
Unconstrained rows never see it.

It sets ``masks_logprobs``: the sampler applies it before taking logprobs, so reported logprobs are those of the
masked distribution (what vLLM reports); penalties and ``logit_bias`` still come after, as for any request.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from lmforge.serve.structured.backends import GrammarMatcher

log = logging.getLogger("lmforge.serve.structured")


def _bit_table() -> torch.Tensor:
    return torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)


_BITS = _bit_table()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set every logit whose bit is 0 in ``bitmask`` (int32 [ceil(V/32)]) to -inf, in place; returns ``logits``."""
    allowed = (bitmask.unsqueeze(-1) & _BITS).ne(0).view(-1)
    n = logits.shape[-1]
    if allowed.numel() < n:  # a bitmask narrower than the logits: tokens past it are not allowed
        allowed = torch.cat([allowed, allowed.new_zeros(n - allowed.numel())])
    return logits.masked_fill_(~allowed[:n], float("-inf"))


class GrammarLogitsProcessor:
    """Constrains one request to a compiled grammar.  Stateful: make one per request (one per choice for ``n > 1``),
    e.g. with ``StructuredOutputs.processor``."""

    masks_logprobs = True

    def __init__(self, matcher: GrammarMatcher, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self.num_accepted = 0
        self.failed = False  # the matcher rejected a sampled token: only eos from here on

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) < self.num_accepted:
            raise RuntimeError("a GrammarLogitsProcessor was shared between requests; make one per request")
        for tok in output_ids[self.num_accepted:]:
            if not self.failed and not self.matcher.accept_token(tok):
                log.warning("the grammar rejected sampled token %d; ending the request", tok)
                self.failed = True
        self.num_accepted = len(output_ids)
        logits = logits.clone()
        if self.failed or self.matcher.is_terminated():
            return self._only_eos(logits)
        self.matcher.fill_bitmask(self.bitmask)
        if not bool(self.bitmask.any()):  # a dead end (cannot happen for a well-formed grammar): stop cleanly
            return self._only_eos(logits)
        return apply_bitmask(logits, self.bitmask)

    def _only_eos(self, logits: torch.Tensor) -> torch.Tensor:
        keep = logits[self.eos]
        logits.fill_(float("-inf"))
        logits[self.eos] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))
        return logits
