"""Grounded answers: retrieve, number the sources in the prompt, generate, keep only citations of retrieved sources.

* Refusal: when the best retrieved chunk's cosine similarity is below ``min_score``, no model is called and the answer
  is ``NOT_FOUND`` ("The knowledge base does not contain ...") with no sources - never a guess.
* Prompt: persona, a short instruction and the numbered sources in the system message; the question is the user turn.
  (Measured with SmolLM2-135M-Instruct: a worked example of a cited answer, or the sources in the user turn, made its
  answers worse and it still wrote no ``[n]`` markers - docs/rag_results.md; attribution supplies the citations.)
* Citations ``[1]``, ``[2, 3]`` in the model's text are parsed; a number that does not name a retrieved source is
  removed from the text (also while streaming), so an answer never cites a source that was not retrieved.
* Attribution (``attribute=True``, the default): a sentence the model left without a citation gets one added after
  the fact - the retrieved source holding the largest share of the sentence's content words (``bm25_tokens``), when
  that share is at least ``min_overlap``.  Only retrieved sources are candidates.  Each citation says how it was made:
  ``method = "model"`` (the model wrote the marker) or ``"attributed"``.  Streaming emits text sentence by sentence
  so the streamed text equals the final answer.
* Follow-ups: with a chat history, the question is first rewritten into a standalone question by the model (falling
  back to "previous question + this one" when the model gives nothing usable); retrieval uses the rewrite.
* Persona: ``system_prompt`` replaces the default instructions' first line (a customer-service voice, a character).
* Re-ranking (optional): a yes/no ``Judge`` scores each of the top ``rerank_depth`` chunks' relevance by the model's
  constrained P("yes") and the best ``k`` are kept (``lmforge.rag.judge``).

Generators: ``EngineGenerator`` (lmforge's serving engine, in process) or ``OpenAIGenerator`` (any OpenAI-compatible
chat endpoint).  Both stream text deltas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterator, Protocol

from lmforge.rag.index import Filters, Hit, KnowledgeBase, Mode, bm25_tokens
from lmforge.rag.judge import Judge, relevance_messages

NOT_FOUND = "The knowledge base does not contain information to answer this question."
DEFAULT_PERSONA = "You are a helpful assistant that answers questions using only the numbered sources you are given."
INSTRUCTIONS = (
    "Answer briefly, using only the sources. End every sentence with the number of the source it comes from in "
    f"square brackets, like [1]. If the sources do not answer the question, reply exactly: \"{NOT_FOUND}\"")


class Generator(Protocol):
    def stream(self, messages: list[dict], max_tokens: int) -> Iterator[str]:
        """Text deltas of the assistant's reply to ``messages``."""
        ...


class EngineGenerator:
    """lmforge's ``Engine`` (chat template, greedy by default).  ``prompt_tokens`` / ``completion_tokens`` add up
    the work of every call (the usage a server reports)."""

    def __init__(self, engine, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        self.engine = engine
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # of the last call: "stop" or "length"

    def stream(self, messages: list[dict], max_tokens: int) -> Iterator[str]:
        from lmforge.serve.sampling import SamplingParams

        ids = self.engine.encode_chat(messages)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            ids = ids[-(self.engine.max_model_len - min(max_tokens, self.engine.max_model_len // 2)):]
            room = self.engine.max_model_len - len(ids)
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=min(max_tokens, room),
                                seed=self.seed, stop_token_ids=sorted(self.engine.chat_stop_token_ids))
        self.prompt_tokens += len(ids)
        for out in self.engine.generate(ids, params):
            self.completion_tokens += len(out.token_ids)
            if out.finished:
                self.finish_reason = out.finish_reason
            if out.text:
                yield out.text


class OpenAIGenerator:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint, streamed."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 temperature: float = 0.0) -> None:
        import os

        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        self.model = model
        self.temperature = temperature

    def stream(self, messages: list[dict], max_tokens: int) -> Iterator[str]:
        resp = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                   temperature=self.temperature, stream=True)
        for chunk in resp:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


@dataclass
class Source:
    number: int
    path: str
    title: str
    heading_path: list[str]
    start: int
    end: int
    text: str
    score: float  # cosine similarity of question and chunk
    relevance: float | None = None  # the re-ranker's P(relevant), when re-ranking is on
    method: str | None = None  # on citations: "model" (the model wrote [n]) or "attributed" (added after the fact)

    def to_dict(self) -> dict:
        out = {"number": self.number, "path": self.path, "title": self.title, "heading_path": self.heading_path,
               "start": self.start, "end": self.end, "score": round(self.score, 4), "text": self.text}
        if self.relevance is not None:
            out["relevance"] = round(self.relevance, 4)
        if self.method is not None:
            out["method"] = self.method
        return out


@dataclass
class RagAnswer:
    question: str
    answer: str
    sources: list[Source]  # what was retrieved and shown to the model, numbered from 1
    citations: list[Source]  # the sources the answer cites (a subset of ``sources``)
    refused: bool = False
    standalone_question: str | None = None

    def to_dict(self) -> dict:
        return {"question": self.question, "standalone_question": self.standalone_question, "answer": self.answer,
                "refused": self.refused, "citations": [c.to_dict() for c in self.citations],
                "sources": [s.to_dict() for s in self.sources]}


@dataclass
class StreamEvent:
    delta: str = ""
    final: RagAnswer | None = None  # set on the last event only


_CITE = re.compile(r"\[(\s*\d+(?:\s*[,;]\s*\d+)*\s*)\]")


def clean_citations(text: str, valid: set[int]) -> tuple[str, list[int]]:
    """Drop citation numbers not in ``valid`` (and brackets left empty); return the text and the cited numbers in
    order of first use."""
    cited: list[int] = []

    def repl(m: re.Match) -> str:
        nums = [int(n) for n in re.split(r"[,;]", m.group(1))]
        keep = [n for n in nums if n in valid]
        for n in keep:
            if n not in cited:
                cited.append(n)
        return "[" + ", ".join(map(str, keep)) + "]" if keep else ""

    cleaned = _CITE.sub(repl, text)
    return re.sub(r"[ \t]+([.,;:!?])", r"\1", cleaned) if cleaned != text else cleaned, cited


class CitationStreamFilter:
    """Streaming version of ``clean_citations``: holds back text from an unclosed ``[`` until it is decided."""

    def __init__(self, valid: set[int], max_hold: int = 16) -> None:
        self.valid = valid
        self.max_hold = max_hold
        self.buf = ""

    def feed(self, delta: str) -> str:
        self.buf += delta
        out = ""
        while self.buf:
            i = self.buf.find("[")
            if i < 0:
                out, self.buf = out + self.buf, ""
                break
            out, self.buf = out + self.buf[:i], self.buf[i:]
            j = self.buf.find("]")
            if j < 0:
                if len(self.buf) > self.max_hold or not re.fullmatch(r"\[[\d\s,;]*", self.buf):
                    out, self.buf = out + self.buf[0], self.buf[1:]
                    continue
                break  # wait for more text
            piece, self.buf = self.buf[:j + 1], self.buf[j + 1:]
            out += clean_citations(piece, self.valid)[0] if _CITE.fullmatch(piece) else piece
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


# a sentence boundary with a following character (so a citation that comes next, "... end. [1]", stays with it):
# whitespace after . ! ?, a newline, or right after a CJK sentence end
_BOUNDARY = re.compile(r"(?:(?<=[.!?])\s+|\n\s*|(?<=[。！？])\s*)(?=[^\s\[])")
_TRAILER = re.compile(r"^(.*?)([.!?。！？:;]*)(\s*)$", re.S)


def lexical_support(sentence: str, source_tokens: set[str]) -> float:
    """Share of the sentence's content words (``bm25_tokens``) found in the source's token set."""
    words = set(bm25_tokens(_CITE.sub(" ", sentence)))
    return len(words & source_tokens) / len(words) if words else 0.0


class Attributor:
    """Adds a citation to each sentence the model left uncited: the retrieved source with the largest lexical support
    (ties: the lower number), when it reaches ``min_overlap``.  Sentences with fewer than ``min_words`` content words
    and refusals are left alone.  ``feed`` / ``flush`` work on a stream (whole sentences come out); ``model_cited`` and
    ``attributed`` collect the numbers used each way."""

    def __init__(self, sources: list[Source], min_overlap: float = 0.5, min_words: int = 2,
                 enabled: bool = True) -> None:
        self.tokens = {s.number: set(bm25_tokens(s.text)) for s in sources}
        self.min_overlap = min_overlap
        self.min_words = min_words
        self.enabled = enabled
        self.model_cited: set[int] = set()
        self.attributed: set[int] = set()
        self.buf = ""

    def sentence(self, sent: str) -> str:
        found = [int(n) for m in _CITE.finditer(sent) for n in re.split(r"[,;]", m.group(1))]
        if found:
            self.model_cited.update(found)
            return sent
        if not self.enabled or "knowledge base does not contain" in sent.lower():
            return sent
        if len(set(bm25_tokens(sent))) < self.min_words or not self.tokens:
            return sent
        best = max(self.tokens, key=lambda n: (lexical_support(sent, self.tokens[n]), -n))
        if lexical_support(sent, self.tokens[best]) < self.min_overlap:
            return sent
        self.attributed.add(best)
        body, punct, space = _TRAILER.match(sent).groups()
        return f"{body} [{best}]{punct}{space}"

    def feed(self, delta: str) -> str:
        self.buf += delta
        out = ""
        while m := _BOUNDARY.search(self.buf):
            out += self.sentence(self.buf[:m.end()])
            self.buf = self.buf[m.end():]
        return out

    def flush(self) -> str:
        out, self.buf = (self.sentence(self.buf) if self.buf.strip() else self.buf), ""
        return out


def attribute_citations(text: str, sources: list[Source], min_overlap: float = 0.5) -> tuple[str, Attributor]:
    """``text`` with citations attributed to its uncited sentences (see ``Attributor``), and the attributor."""
    att = Attributor(sources, min_overlap)
    return att.feed(text) + att.flush(), att


def format_sources(sources: list[Source]) -> str:
    parts = []
    for s in sources:
        where = " > ".join([s.title, *s.heading_path[1:]]) if s.heading_path else s.title
        parts.append(f"[{s.number}] {s.path} ({where})\n{s.text}")
    return "\n\n".join(parts)


class Answerer:
    """Retrieval + generation over a ``KnowledgeBase``.  ``generator=None`` answers only refusals (retrieval-only use).

    ``reranker``: a yes/no ``Judge`` (``lmforge.rag.judge``); the top ``rerank_depth`` retrieved chunks are re-ordered
    by its P(relevant) before the best ``k`` are kept."""

    def __init__(self, kb: KnowledgeBase, generator: Generator | None, *, k: int = 4, mode: Mode = "hybrid",
                 min_score: float = 0.3, system_prompt: str | None = None, max_tokens: int = 256,
                 filters: Filters | None = None, reranker: Judge | None = None, rerank_depth: int = 10,
                 attribute: bool = True, min_overlap: float = 0.5) -> None:
        self.kb = kb
        self.generator = generator
        self.k = k
        self.mode = mode
        self.min_score = min_score
        self.system_prompt = system_prompt or DEFAULT_PERSONA
        self.max_tokens = max_tokens
        self.filters = filters
        self.reranker = reranker
        self.rerank_depth = rerank_depth
        self.attribute = attribute
        self.min_overlap = min_overlap

    def with_options(self, **changes) -> "Answerer":
        """A copy with some settings changed (per-request options of a server)."""
        opts = {"k": self.k, "mode": self.mode, "min_score": self.min_score, "system_prompt": self.system_prompt,
                "max_tokens": self.max_tokens, "filters": self.filters, "reranker": self.reranker,
                "rerank_depth": self.rerank_depth, "attribute": self.attribute, "min_overlap": self.min_overlap,
                "generator": self.generator}
        opts.update(changes)
        return Answerer(self.kb, opts.pop("generator"), **opts)

    # -- steps ---------------------------------------------------------------------------------------------------------
    def rewrite(self, question: str, history: list[dict] | None) -> str:
        """A standalone version of a follow-up question (unchanged without history)."""
        prior = [m["content"] for m in history or [] if m.get("role") == "user" and m.get("content")]
        if not prior:
            return question
        fallback = f"{prior[-1]} {question}"
        if self.generator is None:
            return fallback
        convo = "\n".join(f"{m['role']}: {m['content']}" for m in (history or [])[-6:] if m.get("content"))
        messages = [{"role": "system", "content": "Rewrite the user's last question as a standalone question that "
                     "can be understood without the conversation. Reply with the question only."},
                    {"role": "user", "content": f"Conversation:\n{convo}\n\nLast question: {question}"}]
        text = "".join(self.generator.stream(messages, 64)).strip().splitlines()
        rewritten = text[0].strip() if text else ""
        return rewritten if 3 <= len(rewritten) <= 4 * len(fallback) + 40 else fallback

    def retrieve(self, question: str) -> tuple[list[Source], bool]:
        """Numbered sources for ``question`` and whether they are relevant enough to answer from."""
        depth = max(self.k, self.rerank_depth) if self.reranker is not None else self.k
        hits: list[Hit] = self.kb.search(question, k=depth, mode=self.mode, filters=self.filters)
        relevance: list[float | None] = [None] * len(hits)
        if self.reranker is not None and hits:
            probs = self.reranker.yes_probabilities([relevance_messages(question, h.chunk.text) for h in hits])
            order = sorted(range(len(hits)), key=lambda i: (-probs[i], i))[:self.k]
            hits, relevance = [hits[i] for i in order], [probs[i] for i in order]
        sources = [Source(i, h.chunk.path, h.chunk.title, list(h.chunk.heading_path), h.chunk.start, h.chunk.end,
                          h.chunk.text, h.dense_score, rel) for i, (h, rel) in enumerate(zip(hits, relevance), 1)]
        relevant = bool(sources) and max(s.score for s in sources) >= self.min_score
        return sources, relevant

    def messages(self, question: str, sources: list[Source], history: list[dict] | None = None) -> list[dict]:
        """System (persona, instructions, numbered sources), the last turns of ``history``, the question."""
        system = f"{self.system_prompt}\n\n{INSTRUCTIONS}\n\nSources:\n\n{format_sources(sources)}"
        turns = [m for m in history or [] if m.get("role") in ("user", "assistant")][-4:]
        return [{"role": "system", "content": system}, *turns, {"role": "user", "content": question}]

    # -- public --------------------------------------------------------------------------------------------------------
    def stream(self, question: str, history: list[dict] | None = None) -> Iterator[StreamEvent]:
        """Text deltas (citations already cleaned), then a final event carrying the whole ``RagAnswer``."""
        standalone = self.rewrite(question, history)
        sources, relevant = self.retrieve(standalone)
        if not relevant or self.generator is None:
            yield StreamEvent(NOT_FOUND)
            yield StreamEvent(final=RagAnswer(question, NOT_FOUND, [], [], True, standalone))
            return
        valid = {s.number for s in sources}
        filt = CitationStreamFilter(valid)
        att = Attributor(sources, self.min_overlap, enabled=self.attribute)
        parts: list[str] = []
        for delta in self.generator.stream(self.messages(question if not history else standalone, sources, history),
                                           self.max_tokens):
            out = att.feed(filt.feed(delta))
            if out:
                parts.append(out)
                yield StreamEvent(out)
        tail = att.feed(filt.flush()) + att.flush()
        if tail:
            parts.append(tail)
            yield StreamEvent(tail)
        text, cited = clean_citations("".join(parts).strip(), valid)
        text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text))  # gaps left by dropped citations
        refused = NOT_FOUND.lower().rstrip(".") in text.lower()
        by_number = {s.number: s for s in sources}
        citations = [replace(by_number[n], method="model" if n in att.model_cited else "attributed") for n in cited]
        yield StreamEvent(final=RagAnswer(question, text, sources, citations, refused, standalone))

    def ask(self, question: str, history: list[dict] | None = None) -> RagAnswer:
        final = None
        for event in self.stream(question, history):
            final = event.final or final
        assert final is not None
        return final
