"""Sampling: per-request parameters, logits processors, and the sampler.

A *logits processor* is any callable ``(output_token_ids, logits) -> logits`` over one request's next-token logits
(a 1-D float tensor on the CPU).  Penalties and ``logit_bias`` are processors; a grammar mask for JSON-schema / regex
output or tool calls is just another one appended to ``SamplingParams.logits_processors`` - the scheduler never needs
to know.  The sampler is a plain function over a batch of rows, separate from the scheduler loop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How to sample one completion.  ``temperature == 0`` is greedy; ``max_tokens=None`` means 'until the context
    is full'.  ``stop`` strings are not included in the output; ``stop_token_ids`` end generation (chat models stop at
    ``<|im_end|>`` as well as eos - the engine adds those for chat requests)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if not 0.0 <= self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def processors(self) -> list[LogitsProcessor]:
        """Built-in processors (penalties, bias) followed by the caller's own."""
        procs: list[LogitsProcessor] = []
        if self.presence_penalty or self.frequency_penalty:
            procs.append(penalty_processor(self.presence_penalty, self.frequency_penalty))
        if self.logit_bias:
            procs.append(logit_bias_processor(self.logit_bias))
        return procs + list(self.logits_processors)


def penalty_processor(presence: float, frequency: float) -> LogitsProcessor:
    """OpenAI's presence / frequency penalties over the tokens generated so far."""

    def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_ids:
            return logits
        counts = torch.bincount(torch.tensor(output_ids), minlength=logits.numel())[: logits.numel()]
        counts = counts.to(logits.dtype)
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    return apply


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    vals = torch.tensor(list(bias.values()), dtype=torch.float32)

    def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[ids] += vals.to(logits.dtype)
        return logits

    return apply


class SamplerState:
    """One request's sampler: its params, its processors and its own ``torch.Generator`` (so a seed reproduces a
    completion regardless of other traffic)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.processors = params.processors()
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int is a valid seed


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from 1-D ``logits``: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, states: Sequence[SamplerState], histories: Sequence[list[int]]) -> list[int]:
    """Next token for each row of ``logits`` [B, vocab]; row i uses ``states[i]`` and its output so far ``histories[i]``."""
    logits = logits.detach().float().cpu()
    out = []
    for row, state, hist in zip(logits, states, histories):
        for proc in state.processors:
            row = proc(hist, row)
        out.append(sample_token(row, state.params.temperature, state.params.top_p, state.generator))
    return out
