"""Speculative decoding: cheap guesses of the next few tokens, checked by the served model in one forward pass.

A *proposer* guesses up to ``k`` draft tokens for a sequence; the engine then runs the target model once over the
sequence's last token followed by the drafts (k + 1 positions, keys/values written into the sequence's cache slot) and
``verify`` walks the drafts left to right:

* greedy: a draft is kept while it equals the target's own choice at its position; the first mismatch is replaced by
  the target's token, so the output is token for token what non-speculative greedy decoding gives;
* sampled: a draft ``d`` drawn from the proposer's distribution ``q`` is kept with probability
  ``min(1, p(d) / q(d))`` (``p``: the target's distribution after temperature, penalties, bias and truncation, exactly
  what the plain sampler draws from); on rejection the token is drawn from ``max(p - q, 0)`` normalised and the walk
  stops (Leviathan et al. 2023, Chen et al. 2023).  The output then follows the target's distribution exactly;
  the prompt-lookup proposer's ``q`` puts all its mass on the one draft.

When every draft is kept, the target's distribution after the last one gives one more token for free.  The keys and
values of rejected drafts stay in the cache past the sequence's ``num_cached`` and are overwritten by the next step
(a query never sees positions after its own): that is the whole KV rollback.

Proposers:

* ``NgramProposer`` (prompt lookup): the most recent earlier occurrence of the sequence's last n tokens (n from
  ``ngram_max`` down to ``ngram_min``) in its prompt + output, and the tokens that followed it.  Free, and it pays
  off where the answer copies its context (RAG answers, code edits, summaries).
* ``DraftModelProposer``: a smaller model with the same tokenizer, with its own KV cache (one slot per engine slot),
  run ``k`` times per step for the whole batch.

Penalties, ``logit_bias``, logprobs (of the tokens emitted; rejected drafts are never reported), stop strings and
grammar masks are honoured exactly, because each position is verified with the output it would have had.  A caller's
own logits processor is a black box that may keep state: unless it sets ``speculation_safe = True`` (the grammar
processor does), speculation is off for that request, with a note in its usage extras.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from lmforge.serve.sampling import Sampled, SamplerState, process_logits, token_probs, with_logprobs

if TYPE_CHECKING:
    from lmforge.model.llama import Llama

log = logging.getLogger("lmforge.serve")

METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """How the engine speculates.  ``method``: "ngram" (prompt lookup) or "draft" (``draft_model``: a model folder
    with the served model's tokenizer).  ``num_draft_tokens``: drafts per step (k)."""

    method: str = "ngram"
    num_draft_tokens: int = 4
    draft_model: str | None = None
    ngram_max: int = 3
    ngram_min: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError(f"num_draft_tokens must be in [1, 16], got {self.num_draft_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs a draft model folder (--draft-model)")
        if self.method == "ngram" and self.draft_model:
            raise ValueError("a draft model is only used with the speculative method 'draft'")


@dataclass
class SpecStats:
    """One request's speculation figures (the usage extras ``speculative`` object)."""

    method: str | None = None
    enabled: bool = True
    note: str | None = None
    draft_tokens: int = 0  # drafts proposed
    accepted_tokens: int = 0  # of those, kept
    decode_steps: int = 0  # target forward passes after the first token
    decode_tokens: int = 0  # tokens those passes produced
    decode_seconds: float = 0.0  # wall time of the steps this request took part in
    draft_cached: int = 0  # draft-model mode: tokens whose keys/values are in the draft cache
    k: int = 0  # drafts to ask for next step (adapted to how many were accepted)

    def adapt(self, drafted: int, accepted: int, k_max: int) -> None:
        """Hugging Face's heuristic schedule: two more drafts after a step that kept all, one fewer after one that
        did not (at least one), so requests whose drafts keep failing spend little compute verifying them."""
        if drafted:
            self.k = min(k_max, self.k + 2) if accepted == drafted else max(1, self.k - 1)

    def as_dict(self, plain_step_s: float | None = None) -> dict:
        out: dict = {"method": self.method, "enabled": self.enabled}
        if self.note:
            out["note"] = self.note
        if not self.enabled:
            return out
        out.update(draft_tokens=self.draft_tokens, accepted_tokens=self.accepted_tokens,
                   acceptance_rate=round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else None,
                   decode_steps=self.decode_steps,
                   tokens_per_step=round(self.decode_tokens / self.decode_steps, 4) if self.decode_steps else None,
                   speedup=self.speedup(plain_step_s))
        return out

    def speedup(self, plain_step_s: float | None) -> float | None:
        """Estimated wall-clock speed-up of this request's decoding: its tokens at the engine's recent plain
        (one-token) step time, over the time its speculative steps took."""
        if not plain_step_s or not self.decode_seconds or not self.decode_tokens:
            return None
        return round(self.decode_tokens * plain_step_s / self.decode_seconds, 3)


def speculation_blocker(params) -> str | None:
    """Why speculation cannot serve a request exactly (it then runs without), or None."""
    unsafe = [p for p in params.logits_processors if not getattr(p, "speculation_safe", False)]
    if unsafe:
        return ("speculative decoding is off for this request: a custom logits processor may keep state across "
                "calls (set speculation_safe = True on it if it is a pure function of the output so far)")
    return None


# -- proposers -----------------------------------------------------------------------------------------------------------
def propose_ngram(tokens: Sequence[int], k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """``k`` tokens that followed the most recent earlier occurrence of the last n tokens of ``tokens`` (longest n
    first, from ``ngram_max`` down to ``ngram_min``); [] when there is none.  Where that occurrence is less than
    ``k`` tokens back, the stretch between it and the end is taken to repeat (``a b a b`` → ``a b a b ...``)."""
    n_tok = len(tokens)
    if k < 1 or n_tok < ngram_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, n_tok - 1), ngram_min - 1, -1):
        suffix = arr[n_tok - n:]
        hay = arr[:n_tok - 1]  # a match must be followed by at least one token
        hits = np.flatnonzero(hay[:len(hay) - n + 1] == suffix[0]) if len(hay) >= n else np.empty(0, np.int64)
        for j in range(1, n):
            if not len(hits):
                break
            hits = hits[arr[hits + j] == suffix[j]]
        hits = hits[hits + n < n_tok]
        if len(hits):
            start = int(hits[-1]) + n
            out = arr[start:start + k].tolist()
            while len(out) < k:  # the match overlaps the suffix (a repeating stretch): the repetition goes on
                out.append(out[len(out) - (n_tok - start)])
            return out
    return []


class NgramProposer:
    """Prompt lookup: drafts copied from the sequence's own context (``propose_ngram``)."""

    method = "ngram"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, contexts: list[list[int]], ks: list[int], states: list[SamplerState],
                stats: list[SpecStats], slots: list[int]) -> tuple[list[list[int]], list[list[torch.Tensor] | None]]:
        c = self.config
        return [propose_ngram(ctx, k, c.ngram_max, c.ngram_min) for ctx, k in zip(contexts, ks)], \
            [None] * len(contexts)

    def rollback(self, stats: SpecStats, context_len: int, drafted: int, accepted: int) -> None:
        pass


class DraftModelProposer:
    """A smaller model with the target's tokenizer guesses ``k`` tokens per step for every speculating sequence.

    Its cache has one slot per engine slot; ``SpecStats.draft_cached`` says how much of a sequence's context that
    slot holds.  Sampled requests draw drafts from the draft model's distribution under the request's temperature
    and truncation (``q``, which ``verify`` needs); greedy ones take its argmax."""

    method = "draft"

    def __init__(self, model: "Llama", vocab_size: int, slots: int, max_len: int, dtype: str = "float32",
                 quantize: str | None = None) -> None:
        from lmforge.serve.runner import ModelRunner

        self.runner = ModelRunner(model.eval(), dtype, quantize)
        self.device = self.runner.device
        self.cache = self.runner.allocate_cache(slots, max_len)
        self.max_len = max_len
        self.vocab_size = vocab_size  # the target's: draft logits are cut or padded to it

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                last: torch.Tensor | None = None) -> torch.Tensor:
        out = self.runner.forward(ids.to(self.device), positions.to(self.device), self.cache, rows.to(self.device),
                                  None if last is None else last.to(self.device)).float().cpu()
        V = self.vocab_size
        if out.shape[-1] >= V:
            return out[:, :V]
        return torch.cat([out, out.new_full((out.shape[0], V - out.shape[-1]), float("-inf"))], dim=-1)

    def propose(self, contexts: list[list[int]], ks: list[int], states: list[SamplerState],
                stats: list[SpecStats], slots: list[int]) -> tuple[list[list[int]], list[list[torch.Tensor] | None]]:
        B, k = len(contexts), max(ks)
        starts = [min(s.draft_cached, len(c) - 1) for s, c in zip(stats, contexts)]
        lens = [len(c) - st for c, st in zip(contexts, starts)]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, (c, st) in enumerate(zip(contexts, starts)):
            ids[i, :lens[i]] = torch.tensor(c[st:])
        positions = (torch.tensor(starts)[:, None] + torch.arange(T)).clamp_(max=self.max_len - 1)
        rows = torch.tensor(slots)
        logits = self._logits(ids, positions, rows, torch.tensor([n - 1 for n in lens]))
        drafts: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        for step in range(k):
            nxt = []
            for i, st in enumerate(states):
                p = st.params
                if p.temperature <= 0.0:
                    tok = int(logits[i].argmax())
                else:
                    q = token_probs(logits[i], p.temperature, p.top_p, p.top_k, p.min_p)
                    tok = int(torch.multinomial(q, 1, generator=st.generator))
                    qs[i].append(q)
                drafts[i].append(tok)
                nxt.append(tok)
            if step + 1 == k:
                break
            pos = torch.tensor([[min(len(c) + step, self.max_len - 1)] for c in contexts])
            logits = self._logits(torch.tensor(nxt)[:, None], pos, rows)
        for s, c in zip(stats, contexts):
            s.draft_cached = len(c)  # + the drafts fed; rollback() keeps the accepted ones
        drafts = [d[:n] for d, n in zip(drafts, ks)]
        return drafts, [q[:n] if q else None for q, n in zip(qs, ks)]

    def rollback(self, stats: SpecStats, context_len: int, drafted: int, accepted: int) -> None:
        """After verification: the draft cache holds the context and the first ``drafted - 1`` drafts; keep those
        that were accepted."""
        stats.draft_cached = context_len + min(accepted, max(drafted - 1, 0))


def load_draft_model(path: str, target_tokenizer, target_config, slots: int, max_len: int, dtype: str,
                     quantize: str | None) -> DraftModelProposer:
    """Load a draft model folder; its tokenizer must be the target's (clear error otherwise), and a draft as large
    as the target or larger is a warning (it cannot save time)."""
    from pathlib import Path

    from lmforge.model.hf import load_model
    from lmforge.tokenizer.bpe import load_tokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"draft model folder {folder} does not exist" if not folder.exists()
                         else f"draft model {folder} is not a model folder")
    try:
        tok, _ = load_tokenizer(folder)
    except Exception as err:
        raise ValueError(f"draft model {folder}: cannot read its tokenizer: {type(err).__name__}: {err}") from None
    mine, theirs = target_tokenizer.get_vocab(with_added_tokens=True), tok.get_vocab(with_added_tokens=True)
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(f"draft model {folder} has a different tokenizer from the served model "
                         f"({len(theirs)} vs {len(mine)} tokens; e.g. {diff}): speculative decoding needs the same "
                         f"tokenizer")
    model = load_model(folder, dtype=torch.float32)
    n_draft, n_target = model.config.num_params(), target_config.num_params()
    if n_draft >= n_target:
        log.warning("draft model %s has %.1fM parameters, the served model %.1fM: a draft as large as the target "
                    "cannot speed decoding up", folder, n_draft / 1e6, n_target / 1e6)
    return DraftModelProposer(model, target_config.vocab_size, slots, max_len, dtype, quantize)


# -- verification --------------------------------------------------------------------------------------------------------
def verify(logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor] | None, state: SamplerState,
           history: list[int]) -> tuple[list[Sampled], int]:
    """The tokens to emit for one sequence and how many drafts were accepted.

    ``logits`` [len(drafts) + 1, vocab]: the target's logits after the last token and after each draft;
    ``qs``: the proposer's distribution for each draft (None: all mass on the draft); ``history``: the output so
    far.  Returns the accepted drafts followed by one token of the target's (a correction or the bonus token)."""
    p = state.params
    out: list[Sampled] = []
    hist = list(history)
    for i in range(len(drafts) + 1):
        raw, row = process_logits(logits[i], state, hist)
        if p.temperature <= 0.0:
            tok = int(torch.argmax(row))
            out.append(with_logprobs(tok, raw, p))
            if i == len(drafts) or tok != drafts[i]:
                return out, i
            hist.append(tok)
            continue
        probs = token_probs(row, p.temperature, p.top_p, p.top_k, p.min_p)
        if i == len(drafts):
            tok = int(torch.multinomial(probs, 1, generator=state.generator))
            out.append(with_logprobs(tok, raw, p))
            return out, i
        d = drafts[i]
        q_d = 1.0 if qs is None else float(qs[i][d])
        if q_d > 0 and float(torch.rand(1, generator=state.generator)) * q_d < float(probs[d]):
            out.append(with_logprobs(d, raw, p))
            hist.append(d)
            continue
        if qs is None:
            residual = probs.clone()
            residual[d] = 0.0
        else:
            residual = (probs - qs[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q (up to rounding): any draw from p is right
            residual = probs
        tok = int(torch.multinomial(residual, 1, generator=state.generator))
        out.append(with_logprobs(tok, raw, p))
        return out, i
    raise AssertionError("unreachable")
