"""Model backends of the agent loop, behind one small interface (:class:`ModelBackend`):

- :class:`EngineBackend`: lmforge's serving ``Engine`` in process.  The conversation is rendered with
  ``render_messages`` (tools in the system message, Hermes-style ``<tool_call>`` blocks) and the model's chat
  template; ``tool_call_grammar`` constrains decoding so every call is well-formed JSON whose arguments match the
  tool's schema; ``ToolCallParser`` reads the text back into content and calls as it streams.
- :class:`OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (``tools`` / ``tool_choice``),
  through the official ``openai`` client, streamed.
- :class:`ScriptedModel`: replays given turns (tests, demos).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Union

from lmforge.agent.tools import Call


@dataclass
class ModelTurn:
    """One assistant turn: its text and its tool calls (none: the final answer)."""

    content: str = ""
    calls: list[Call] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    # in-process engine only: seconds to the first token (prefill, incl. queueing) and after it (decode), and the
    # prompt tokens whose keys/values the prefix cache already held
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    cached_tokens: int | None = None


TurnStream = Iterator[Union[str, ModelTurn]]  # text deltas, then the whole turn


class ModelError(RuntimeError):
    """The model could not produce a turn (endpoint error, conversation longer than the context)."""


class ModelBackend(Protocol):
    name: str

    def stream(self, messages: list[dict], tools: list[dict], tool_choice: str = "auto") -> TurnStream:
        """Content text deltas (``str``) as they are generated, then one :class:`ModelTurn` (the whole turn).
        ``messages`` are OpenAI chat messages (assistant ``tool_calls``, ``tool`` results)."""
        ...


class EngineBackend:
    """The in-process lmforge ``Engine`` with grammar-constrained tool calls."""

    def __init__(self, engine: Any, *, temperature: float = 0.0, max_tokens: int = 512, seed: int | None = None,
                 parallel_tool_calls: bool = True, structured: Any = None) -> None:
        from lmforge.serve.structured import StructuredOutputs

        self.engine = engine
        self.name = "engine"
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.parallel = parallel_tool_calls
        self.structured = structured or StructuredOutputs.for_engine(engine)
        self._calls = 0

    def stream(self, messages: list[dict], tools: list[dict], tool_choice: str = "auto") -> TurnStream:
        from lmforge.serve.sampling import SamplingParams
        from lmforge.serve.tools import (TAG, ToolCallParser, parse_tool_choice, parse_tools, render_messages,
                                         tool_call_grammar)

        parsed = parse_tools(tools)
        choice = parse_tool_choice(tool_choice if parsed else None, parsed)
        ids = self.engine.encode_chat(render_messages(messages, parsed, choice))
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            raise ModelError(f"the conversation ({len(ids)} tokens) no longer fits the model's context "
                             f"({self.engine.max_model_len} tokens)")
        spec = tool_call_grammar(parsed, choice, self.parallel)
        procs = [self.structured.processor(spec)] if spec is not None else []
        seed = None if self.seed is None else self.seed + self._calls
        self._calls += 1
        params = SamplingParams(temperature=self.temperature, max_tokens=min(self.max_tokens, room), seed=seed,
                                stop_token_ids=sorted(self.engine.chat_stop_token_ids), logits_processors=procs)
        parser = ToolCallParser()
        completion, finish = 0, None
        hits_before = getattr(self.engine, "prefix_cache_hits", None)  # exact with one request at a time
        start = time.perf_counter()
        first = None
        for out in self.engine.generate(ids, params):
            if first is None and out.token_ids:
                first = time.perf_counter()
            completion += len(out.token_ids)
            finish = out.finish_reason or finish
            for ev in parser.feed(out.text):
                if ev.content:
                    yield ev.content
        for ev in parser.finish():
            if ev.content:
                yield ev.content
        content = parser.content
        calls = [Call(c.id, c.name, c.arguments, c.complete) for c in parser.calls]
        at = content.find(TAG) if not calls else -1
        if not calls and at < 0 and finish == "length":  # cut off inside the tag itself ("<tool_ca")
            at = next((len(content) - k for k in range(len(TAG) - 1, 0, -1) if content.endswith(TAG[:k])), -1)
        if at >= 0:  # the grammar keeps the tag out of text: a call cut off in its head
            content, calls = content[:at].rstrip(), [Call(parser.new_id(), "", content[at + len(TAG):], False)]
        end = time.perf_counter()
        first = first or end
        yield ModelTurn(content, calls, len(ids), completion, finish, prefill_seconds=first - start,
                        decode_seconds=end - first,
                        cached_tokens=None if hits_before is None else self.engine.prefix_cache_hits - hits_before)


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (``tools`` / ``tool_choice``), streamed."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None, client: Any = None,
                 temperature: float = 0.0, max_tokens: int = 512, timeout: float = 120.0) -> None:
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        self.client = client
        self.model = self.name = model
        self.temperature = temperature
        self.max_tokens = max_tokens

    def stream(self, messages: list[dict], tools: list[dict], tool_choice: str = "auto") -> TurnStream:
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                  "temperature": self.temperature, "max_tokens": self.max_tokens,
                                  "stream_options": {"include_usage": True}}
        if tools:
            kwargs.update(tools=tools, tool_choice=tool_choice)
        content: list[str] = []
        slots: dict[int, dict[str, str]] = {}
        turn = ModelTurn()
        try:
            for chunk in self.client.chat.completions.create(**kwargs):
                if chunk.usage is not None:
                    turn.prompt_tokens = chunk.usage.prompt_tokens or 0
                    turn.completion_tokens = chunk.usage.completion_tokens or 0
                for ch in chunk.choices:
                    d = ch.delta
                    if d is not None and d.content:
                        content.append(d.content)
                        yield d.content
                    for tc in (d.tool_calls if d is not None else None) or []:
                        slot = slots.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] = tc.id or slot["id"]
                        if tc.function is not None:
                            slot["name"] += tc.function.name or ""
                            slot["arguments"] += tc.function.arguments or ""
                    turn.finish_reason = ch.finish_reason or turn.finish_reason
        except openai.OpenAIError as err:
            raise ModelError(f"{type(err).__name__}: {err}") from None
        turn.content = "".join(content)
        turn.calls = [Call(s["id"] or f"call_{i}", s["name"], s["arguments"]) for i, s in sorted(slots.items())]
        yield turn


class ScriptedModel:
    """Replays ``turns`` in order: a ``str`` is a final answer, a list of ``(name, arguments)`` pairs is one turn of
    tool calls (``arguments`` a dict, or raw text to send as is), a :class:`ModelTurn` is used as given.  Answers
    stream word by word.  ``requests`` keeps the messages each call received."""

    def __init__(self, turns: list[Any]) -> None:
        self.turns = list(turns)
        self.name = "scripted"
        self.requests: list[list[dict]] = []
        self.tools_seen: list[list[dict]] = []
        self.choices: list[str] = []

    def stream(self, messages: list[dict], tools: list[dict], tool_choice: str = "auto") -> TurnStream:
        self.requests.append(json.loads(json.dumps(messages)))
        self.tools_seen.append(tools)
        self.choices.append(tool_choice)
        n = len(self.requests)
        if n > len(self.turns):
            raise ModelError(f"the scripted model has only {len(self.turns)} turns (call {n})")
        turn = self.turns[n - 1]
        if isinstance(turn, str):
            turn = ModelTurn(turn)
        elif not isinstance(turn, ModelTurn):
            turn = ModelTurn("", [Call(f"call_{n}_{i}", name, args if isinstance(args, str) else json.dumps(args))
                                  for i, (name, args) in enumerate(turn)])
        for piece in re.findall(r"\S+\s*|\s+", turn.content):
            yield piece
        yield turn
