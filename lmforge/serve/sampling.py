"""Sampling: per-request parameters, logits processors, and the sampler.

A *logits processor* is any callable ``(output_token_ids, logits) -> logits`` over one request's next-token logits
(a 1-D float tensor on the CPU).  Penalties and ``logit_bias`` are processors; a grammar mask for JSON-schema / regex
output or tool calls is just another one appended to ``SamplingParams.logits_processors`` - the scheduler never needs
to know.  A processor with a true ``masks_logprobs`` attribute (the grammar mask, lmforge.serve.structured) runs
before the others and before logprobs are taken: logprobs are those of the masked distribution.  The sampler is a plain function over a batch of rows, separate from the scheduler loop.
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
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM style, over prompt + output tokens; 1.0 is off
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus the k most likely
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
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive count, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batch can take one argmax."""
        return (self.temperature <= 0.0 and self.logprobs is None and not self.logits_processors
                and not self.logit_bias and not self.presence_penalty and not self.frequency_penalty
                and self.repetition_penalty == 1.0)

    def processors(self, prompt_ids: Sequence[int] = ()) -> list[LogitsProcessor]:
        """Built-in processors (penalties, bias) followed by the caller's own."""
        procs: list[LogitsProcessor] = []
        if self.repetition_penalty != 1.0:
            procs.append(repetition_penalty_processor(self.repetition_penalty, prompt_ids))
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


def repetition_penalty_processor(penalty: float, prompt_ids: Sequence[int]) -> LogitsProcessor:
    """CTRL / HF repetition penalty: a logit of a token seen in the prompt or output is divided by ``penalty`` if
    positive, multiplied if negative."""
    prompt = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)

    def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen = torch.cat([prompt, torch.tensor(output_ids, dtype=torch.long)]).unique() if output_ids else prompt
        if seen.numel() == 0:
            return logits
        logits = logits.clone()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
        return logits

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

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        self.params = params
        procs = params.processors(prompt_ids)
        self.masks = [p for p in procs if getattr(p, "masks_logprobs", False)]
        self.processors = [p for p in procs if not getattr(p, "masks_logprobs", False)]
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int is a valid seed


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                 top_k: int = 0, min_p: float = 0.0) -> int:
    """One token from 1-D ``logits``: greedy at temperature 0, else temperature, then top-k, min-p and nucleus (top-p)
    truncation, then a draw from ``generator``."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0 or top_p < 1.0 or min_p > 0.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
        if top_k > 0:
            drop[top_k:] = True
        if min_p > 0.0:
            drop |= sorted_probs < min_p * sorted_probs[0]
        if top_p < 1.0:
            drop |= sorted_probs.cumsum(0) - sorted_probs > top_p  # the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[draw(sorted_probs, generator)])
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index of 1-D ``weights`` (>= 0, not all 0) drawn with probability proportional to its weight, by inverting
    the cumulative distribution at one uniform number from ``generator``.  The distribution ``torch.multinomial``
    samples, at a fraction of its cost: its one-sample path draws an exponential number per entry (49k per token for
    a 49k vocabulary, about 1 ms on one core, a tenth of a 16-stream decode step of SmolLM2-135M).  An entry of weight
    0 is never drawn (its cumulative sum equals its predecessor's, and the search takes the first entry above u)."""
    cdf = weights.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= len(cdf):  # u rounded up to the total: the last entry with weight
        i = int(torch.nonzero(weights).max())
    return i


@dataclass
class Sampled:
    """A sampled token; with ``SamplingParams.logprobs`` set, its log-probability and the ``top`` alternatives
    (``[(token_id, logprob)]``, most likely first) under the model's raw distribution (after a grammar mask, if any)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, states: Sequence[SamplerState], histories: Sequence[list[int]]) -> list[Sampled]:
    """Next token for each row of ``logits`` [B, vocab]; row i uses ``states[i]`` and its output so far ``histories[i]``.

    Each row draws from its own request's generator, so a seeded request gives the same tokens whatever else is in
    the batch."""
    logits = logits.detach().float().cpu()
    if all(s.params.is_plain_greedy for s in states):
        return [Sampled(int(t)) for t in logits.argmax(dim=-1).tolist()]
    out = []
    for row, state, hist in zip(logits, states, histories):
        p = state.params
        raw, row = process_logits(row, state, hist)
        tok = sample_token(row, p.temperature, p.top_p, state.generator, p.top_k, p.min_p)
        out.append(with_logprobs(tok, raw, p))
    return out


def process_logits(row: torch.Tensor, state: SamplerState, history: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, processed)`` logits of one row: ``raw`` after the grammar mask (what logprobs are taken from),
    ``processed`` after penalties, bias and the caller's processors too (what the sampler draws from)."""
    for mask in state.masks:
        row = mask(history, row)
    raw = row
    for proc in state.processors:
        row = proc(history, row)
    return raw, row


def with_logprobs(token: int, raw: torch.Tensor, params: SamplingParams) -> Sampled:
    """``token`` as a ``Sampled``, with its logprob and the top alternatives of ``raw`` when the request asks."""
    if params.logprobs is None:
        return Sampled(token)
    lp = torch.log_softmax(raw, dim=-1)
    top = []
    if params.logprobs > 0:
        vals, ids = lp.topk(params.logprobs)
        top = [(i, v) for i, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf")]  # masked: not shown
    return Sampled(token, float(lp[token]), top)


def token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                min_p: float = 0.0) -> torch.Tensor:
    """The distribution ``sample_token`` draws from at ``temperature > 0`` (temperature, then top-k, min-p and
    top-p truncation), as a probability vector over the vocabulary (float32)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0 or top_p < 1.0 or min_p > 0.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
        if top_k > 0:
            drop[top_k:] = True
        if min_p > 0.0:
            drop |= sorted_probs < min_p * sorted_probs[0]
        if top_p < 1.0:
            drop |= sorted_probs.cumsum(0) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return probs
