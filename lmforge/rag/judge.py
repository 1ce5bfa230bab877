"""Yes/no judgements by a language model with constrained output: passage relevance (LLM re-ranking) and whether a
cited sentence is supported by its source (faithfulness).

* ``EngineJudge`` (lmforge's engine, in process): one greedy token under a logits processor that keeps only the
  "yes" / "no" tokens (every other logit is -inf) and records their logits, so the reply is always yes or no and
  P(yes) = softmax over the two groups.  A batch of questions is queued at once, so the engine decodes them together.
* ``OpenAIJudge`` (any OpenAI-compatible chat endpoint): one token with ``logprobs`` / ``top_logprobs``; P(yes) is
  read from the yes / no alternatives (normalised over the two); when neither is among them, the reply's text decides.
  ``extra_body`` is sent with every request: against an lmforge server with a knowledge base attached, pass
  ``{"rag": False}`` so the judge's prompt reaches the model as it is instead of being answered from the knowledge base.

``relevance_messages`` / ``support_messages`` build the two prompts.
"""

from __future__ import annotations

import math
import queue
from typing import Protocol

import torch

YES_WORDS = ("yes", "Yes", " yes", " Yes", "YES")
NO_WORDS = ("no", "No", " no", " No", "NO")
MAX_PASSAGE_CHARS = 2000


class Judge(Protocol):
    def yes_probabilities(self, conversations: list[list[dict]]) -> list[float]:
        """P(the answer is yes) for each conversation (a list of chat messages ending with the question)."""
        ...


def relevance_messages(question: str, passage: str) -> list[dict]:
    return [{"role": "system", "content": "You judge whether a passage helps to answer a question. "
                                          "Reply with one word: yes or no."},
            {"role": "user", "content": f"Question: {question}\n\nPassage:\n{passage[:MAX_PASSAGE_CHARS]}\n\n"
                                        "Does the passage contain information that answers the question? "
                                        "Answer yes or no."}]


def support_messages(claim: str, source: str) -> list[dict]:
    return [{"role": "system", "content": "You check statements against a source text. "
                                          "Reply with one word: yes or no."},
            {"role": "user", "content": f"Source:\n{source[:2 * MAX_PASSAGE_CHARS]}\n\nStatement: {claim}\n\n"
                                        "Is the statement supported by the source? Answer yes or no."}]


def yes_no_token_ids(encode, yes_words=YES_WORDS, no_words=NO_WORDS) -> tuple[list[int], list[int]]:
    """First token of each spelling of yes / no (``encode(text) -> ids`` without special tokens); a token that
    starts both a yes and a no spelling is dropped.  Raises ``ValueError`` when one side is left empty."""
    yes = {ids[0] for w in yes_words if (ids := encode(w))}
    no = {ids[0] for w in no_words if (ids := encode(w))}
    both = yes & no
    yes, no = sorted(yes - both), sorted(no - both)
    if not yes or not no:
        raise ValueError("the tokenizer gives no distinct first tokens for 'yes' and 'no'")
    return yes, no


class YesNoProcessor:
    """Logits processor: only the yes / no tokens stay possible; the first call's logits of both groups are kept."""

    def __init__(self, yes_ids: list[int], no_ids: list[int]) -> None:
        self.yes = torch.tensor(yes_ids, dtype=torch.long)
        self.no = torch.tensor(no_ids, dtype=torch.long)
        self.p_yes: float | None = None

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.p_yes is None:
            lse_yes = torch.logsumexp(logits[self.yes].float(), 0)
            lse_no = torch.logsumexp(logits[self.no].float(), 0)
            self.p_yes = float(torch.sigmoid(lse_yes - lse_no))
        out = torch.full_like(logits, float("-inf"))
        out[self.yes] = logits[self.yes]
        out[self.no] = logits[self.no]
        return out


class EngineJudge:
    """Constrained yes/no with lmforge's ``Engine``: every question is queued at once and decoded as a batch."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.yes_ids, self.no_ids = yes_no_token_ids(lambda w: engine.encode(w, add_special_tokens=False))

    def yes_probabilities(self, conversations: list[list[dict]]) -> list[float]:
        from lmforge.serve.sampling import SamplingParams

        done: queue.Queue = queue.Queue()
        procs, rids = [], []
        for messages in conversations:
            proc = YesNoProcessor(self.yes_ids, self.no_ids)
            params = SamplingParams(temperature=0.0, max_tokens=1, logits_processors=[proc])
            ids = self.engine.encode_chat(messages)
            if len(ids) >= self.engine.max_model_len:  # keep the end: the question and the assistant turn
                ids = ids[-(self.engine.max_model_len - 1):]
            rids.append(self.engine.add_request(ids, params, done.put))
            procs.append(proc)
        pending = set(rids)
        try:
            while pending:
                out = done.get()
                if out.error is not None:
                    raise RuntimeError(f"judge request failed: {out.error}")
                if out.finished:
                    pending.discard(out.request_id)
        finally:
            for rid in pending:
                self.engine.abort(rid)
        return [p.p_yes if p.p_yes is not None else 0.5 for p in procs]


class OpenAIJudge:
    """Yes/no through any OpenAI-compatible chat endpoint, from the first token's top log-probabilities."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 top_logprobs: int = 20, extra_body: dict | None = None) -> None:
        import os

        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        self.model = model
        self.top_logprobs = top_logprobs
        self.extra_body = extra_body

    def yes_probability(self, messages: list[dict]) -> float:
        resp = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=1, temperature=0.0,
                                                   logprobs=True, top_logprobs=self.top_logprobs,
                                                   extra_body=self.extra_body)
        choice = resp.choices[0]
        yes = no = 0.0
        content = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        for alt in content[0].top_logprobs if content else []:
            word = alt.token.strip().lower()
            if word == "yes":
                yes += math.exp(alt.logprob)
            elif word == "no":
                no += math.exp(alt.logprob)
        if yes + no > 0:
            return yes / (yes + no)
        text = (choice.message.content or "").strip().lower()
        return 1.0 if text.startswith("y") else 0.0 if text.startswith("n") else 0.5

    def yes_probabilities(self, conversations: list[list[dict]]) -> list[float]:
        return [self.yes_probability(m) for m in conversations]
