"""Grounded answers: retrieve, number the sources in the prompt, generate, keep only citations of retrieved sources.

* Refusal: when the best retrieved chunk's cosine similarity is below ``min_score``, no model is called and the answer
  is ``NOT_FOUND`` ("The knowledge base does not contain ...") with no sources - never a guess.
* Prompt: persona, a short instruction and the numbered sources in the system message; the question is the user turn.
  (Measured with SmolLM2-135M-Instruct: a worked example of a cited answer, or the sources in the user turn, made its
  answers worse and it still wrote no ``[n]`` markers - docs/rag_results.md; attribution supplies the citations.)
* Citations ``[1]``, ``[2, 3]`` in the model's text are parsed; a number that does not name a retrieved source is
  removed from the text (also while streaming), so an answer never cites a source that was not retrieved.
* Attribution (``attribute=True``, the default): every sentence is checked against the retrieved sources with
  ``support_score`` (content words *and* adjacent word pairs found in the source; threshold ``min_support``, measured
  in docs/rag_results.md).  A model citation of a source that does not support its sentence is removed; a sentence
  without a supported citation gets the best-supporting source, or is marked ``[unsupported]`` when none reaches the
  threshold.  An answer with no supported sentence is withheld: the reply is ``NOT_FOUND`` (``refused``), the model's
  text is kept in ``RagAnswer.ungrounded_text``.  Each citation says how it was made: ``method = "model"`` (the
  model wrote the marker) or ``"attributed"``.  Streaming emits text sentence by sentence (held back until the first
  supported sentence) so the streamed text equals the final answer.
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
from dataclasses import dataclass, field, replace
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
    unsupported: list[str] = field(default_factory=list)  # sentences no retrieved source supports (marked in text)
    ungrounded_text: str | None = None  # the model's answer, withheld because no sentence of it was supported

    def to_dict(self) -> dict:
        out = {"question": self.question, "standalone_question": self.standalone_question, "answer": self.answer,
               "refused": self.refused, "citations": [c.to_dict() for c in self.citations],
               "sources": [s.to_dict() for s in self.sources], "unsupported": self.unsupported}
        if self.ungrounded_text is not None:
            out["ungrounded_text"] = self.ungrounded_text
        return out


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


SUPPORT_THRESHOLD = 0.6  # measured: docs/rag_results.md "Citations only where the source supports the sentence"
UNSUPPORTED = "[unsupported]"
PAIR_WINDOW = 3
_ASCII_WORD = re.compile(r"[a-z0-9_'.-]+")


class SupportIndex:
    """The content words and the adjacent content-word pairs of one source, for :func:`support_score`."""

    def __init__(self, text: str) -> None:
        toks = bm25_tokens(text)
        self.words = set(toks)
        words = [t for t in toks if _ASCII_WORD.fullmatch(t)]
        # ordered pairs up to PAIR_WINDOW content words apart: a sentence that condenses the source keeps its pairs
        self.pairs = {(a, b) for k in range(1, PAIR_WINDOW + 1) for a, b in zip(words, words[k:])}


def support_score(sentence: str, source: str | SupportIndex) -> float:
    """How far ``source`` supports ``sentence``: the mean of the share of its content words found in the source and
    the share of its adjacent content-word pairs found there in the same order, at most ``PAIR_WINDOW`` content words
    apart (CJK text: the first share only).

    The pair share is what separates a sentence copied or condensed from the source from a wrong one made of the
    source's words: "Django is named after Guido van Rossum, a jazz guitarist" shares most words with the Django FAQ
    but few of their pairs."""
    idx = source if isinstance(source, SupportIndex) else SupportIndex(source)
    toks = bm25_tokens(_CITE.sub(" ", sentence))
    words = set(toks)
    if not words:
        return 0.0
    uni = len(words & idx.words) / len(words)
    ascii_words = [t for t in toks if _ASCII_WORD.fullmatch(t)]
    pairs = set(zip(ascii_words, ascii_words[1:]))
    if not pairs:
        return uni
    return (uni + len(pairs & idx.pairs) / len(pairs)) / 2


class Attributor:
    """Checks every sentence of an answer against the retrieved sources (``support_score`` ≥ ``min_support``).

    * A citation the model wrote is kept only for sources that support the sentence; the others are removed.
    * A sentence left without a supported citation gets one: the source that supports it best (ties: the lower
      number), when it reaches ``min_support``.
    * A sentence no source supports is marked ``[unsupported]`` (``mark_unsupported``) and counted in
      ``unsupported``; ``grounded`` is False while no sentence is supported.
    * Sentences with fewer than ``min_words`` content words ("Yes.", "See also [1].") and refusals are left alone.

    ``verify=False`` is the old behaviour (kept for comparison in bench/rag_faithfulness.py): model citations are
    kept as written and an uncited sentence is attributed when the share of its content words found in a source is at
    least ``min_support``; nothing is marked.  ``feed`` / ``flush`` work on a stream (whole sentences come out);
    ``model_cited`` and ``attributed`` collect the numbers used each way."""

    def __init__(self, sources: list[Source], min_support: float = SUPPORT_THRESHOLD, min_words: int = 2,
                 enabled: bool = True, verify: bool = True, mark_unsupported: bool = True) -> None:
        self.index = {s.number: SupportIndex(s.text) for s in sources}
        self.tokens = {n: ix.words for n, ix in self.index.items()}
        self.min_support = min_support
        self.min_words = min_words
        self.enabled = enabled
        self.verify = verify
        self.mark_unsupported = mark_unsupported and verify
        self.model_cited: set[int] = set()
        self.attributed: set[int] = set()
        self.dropped_citations = 0  # model citations of a source that does not support the sentence
        self.supported = 0
        self.unsupported: list[str] = []
        self.buf = ""

    @property
    def grounded(self) -> bool:
        """False when the answer has sentences to check and no source supports any of them."""
        return self.supported > 0 or not self.unsupported

    def _score(self, sent: str, n: int) -> float:
        return support_score(sent, self.index[n]) if self.verify else lexical_support(sent, self.tokens[n])

    @staticmethod
    def _mark(sent: str, mark: str) -> str:
        body, punct, space = _TRAILER.match(sent).groups()
        return f"{body} {mark}{punct}{space}"

    def sentence(self, sent: str) -> str:
        found = [int(n) for m in _CITE.finditer(sent) for n in re.split(r"[,;]", m.group(1))]
        refusal = "knowledge base does not contain" in sent.lower()
        short = len(set(bm25_tokens(_CITE.sub(" ", sent)))) < self.min_words
        if not self.enabled or refusal or short or (found and not self.verify) or not self.index:
            self.model_cited.update(found)
            return sent
        if found:
            keep = [n for n in dict.fromkeys(found) if n in self.index and self._score(sent, n) >= self.min_support]
            self.dropped_citations += len(set(found)) - len(keep)
            if len(keep) == len(set(found)):  # every citation holds: the model's text stays as written
                self.model_cited.update(keep)
                self.supported += 1
                return sent
            sent = re.sub(r"[ \t]+([.,;:!?。！？])", r"\1", _CITE.sub("", sent))
            if keep:
                self.model_cited.update(keep)
                self.supported += 1
                return self._mark(sent, f"[{', '.join(map(str, keep))}]")
            # the model cited sources that do not say this: look for one that does
        best = max(self.index, key=lambda n: (self._score(sent, n), -n))
        if self._score(sent, best) < self.min_support:
            self.unsupported.append(_CITE.sub("", sent).strip())
            return self._mark(sent, UNSUPPORTED) if self.mark_unsupported else sent
        self.attributed.add(best)
        self.supported += 1
        return self._mark(sent, f"[{best}]")

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


def split_sentences(text: str) -> list[str]:
    """The sentences of an answer, as the attributor sees them (a citation after the end stays with its sentence)."""
    out, pos = [], 0
    for m in _BOUNDARY.finditer(text):
        out.append(text[pos:m.end()])
        pos = m.end()
    if text[pos:].strip():
        out.append(text[pos:])
    return out


def attribute_citations(text: str, sources: list[Source], min_support: float = SUPPORT_THRESHOLD,
                        ) -> tuple[str, Attributor]:
    """``text`` with its citations verified and attributed (see ``Attributor``), and the attributor."""
    att = Attributor(sources, min_support)
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
                 attribute: bool = True, min_support: float = SUPPORT_THRESHOLD) -> None:
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
        self.min_support = min_support

    def with_options(self, **changes) -> "Answerer":
        """A copy with some settings changed (per-request options of a server)."""
        opts = {"k": self.k, "mode": self.mode, "min_score": self.min_score, "system_prompt": self.system_prompt,
                "max_tokens": self.max_tokens, "filters": self.filters, "reranker": self.reranker,
                "rerank_depth": self.rerank_depth, "attribute": self.attribute, "min_support": self.min_support,
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
        att = Attributor(sources, self.min_support, enabled=self.attribute)
        parts: list[str] = []
        held: list[str] = []  # with attribution on, nothing is shown before some sentence is found supported
        for delta in self.generator.stream(self.messages(question if not history else standalone, sources, history),
                                           self.max_tokens):
            out = att.feed(filt.feed(delta))
            if not out:
                continue
            if self.attribute and att.supported == 0:
                held.append(out)
                continue
            if held:
                out, held = "".join(held) + out, []
            parts.append(out)
            yield StreamEvent(out)
        tail = "".join(held) + att.feed(filt.flush()) + att.flush()
        if self.attribute and not att.grounded:
            # no sentence of the answer is supported by a retrieved source: say so, never show unsupported text
            ungrounded = "".join(parts) + tail
            yield StreamEvent(NOT_FOUND)
            yield StreamEvent(final=RagAnswer(question, NOT_FOUND, sources, [], True, standalone,
                                              unsupported=list(att.unsupported), ungrounded_text=ungrounded.strip()))
            return
        if tail:
            parts.append(tail)
            yield StreamEvent(tail)
        text, cited = clean_citations("".join(parts).strip(), valid)
        text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text))  # gaps left by dropped citations
        refused = NOT_FOUND.lower().rstrip(".") in text.lower()
        by_number = {s.number: s for s in sources}
        citations = [replace(by_number[n], method="model" if n in att.model_cited else "attributed") for n in cited]
        yield StreamEvent(final=RagAnswer(question, text, sources, citations, refused, standalone,
                                          unsupported=list(att.unsupported)))

    def ask(self, question: str, history: list[dict] | None = None) -> RagAnswer:
        final = None
        for event in self.stream(question, history):
            final = event.final or final
        assert final is not None
        return final
