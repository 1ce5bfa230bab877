"""The agent loop: messages → model → tool calls → tools (concurrently) → tool messages → model … → answer.

It ends with a final answer (a turn without tool calls), at the step limit (``max_steps`` model calls; a clear
message and ``stop_reason="max_steps"``) or on a model error (``stop_reason="model_error"``), never with a
traceback.  Tool output goes back to the model as the content of a ``tool`` message: data, never read by the loop.
``Agent.stream`` yields :class:`AgentEvent`s (step, answer deltas, tool calls, tool results, final); every model call
and tool call is also recorded in ``AgentResult.trace`` (and appended to ``OUT/trace.jsonl`` with ``out_dir``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from lmforge.agent.backends import ModelBackend, ModelTurn
from lmforge.agent.tools import Call, CallResult, FunctionTool, as_tool, history_arguments, run_calls

STOPPED = "Stopped: the step limit ({n} model calls) was reached before a final answer."


@dataclass
class AgentResult:
    answer: str
    stop_reason: str  # "answer" | "max_steps" | "model_error"
    steps: int  # model calls made
    messages: list[dict]
    trace: list[dict]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class AgentEvent:
    """``type``: ``step`` (a model call starts), ``delta`` (model text as it streams; in the last step, the answer),
    ``tool_call``, ``tool_result``, ``final`` (``result`` set)."""

    type: str
    step: int
    text: str = ""
    call: Call | None = None
    tool_result: CallResult | None = None
    result: AgentResult | None = None


@dataclass
class Agent:
    model: ModelBackend
    tools: Iterable[FunctionTool | Callable[..., Any]] = ()
    system: str | None = None
    max_steps: int = 8
    # "auto"; "first": the first turn must call a tool, later turns choose (small models that otherwise answer from
    # memory); "required": every turn must call tools (the loop then ends at max_steps)
    tool_choice: str = "auto"
    out_dir: str | Path | None = None
    parallel_tools: bool = True  # False: a turn's calls run one after another, in order (stateful tools)
    _tools: dict[str, FunctionTool] = field(init=False, repr=False)
    last_trace: list[dict] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.tool_choice not in ("auto", "first", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'first' or 'required', got {self.tool_choice!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self._tools = {}
        for t in self.tools:
            ft = as_tool(t)
            if ft.name in self._tools:
                raise ValueError(f"two tools are named {ft.name!r}")
            self._tools[ft.name] = ft

    def _choice(self, step: int) -> str:
        if self.tool_choice == "first":
            return "required" if step == 1 else "auto"
        return self.tool_choice

    @property
    def tool_declarations(self) -> list[dict]:
        return [t.to_openai() for t in self._tools.values()]

    def run(self, question: str | list[dict]) -> AgentResult:
        for ev in self.stream(question):
            if ev.type == "final":
                assert ev.result is not None
                return ev.result
        raise AssertionError("the agent stream ended without a final event")

    def stream(self, question: str | list[dict]) -> Iterator[AgentEvent]:
        messages: list[dict] = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        if self.system and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        decls = self.tool_declarations
        trace: list[dict] = []
        self.last_trace = trace  # readable while streaming, and after a stream closed early
        sink: IO[str] | None = None
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            sink = open(Path(self.out_dir) / "trace.jsonl", "a", encoding="utf-8")

        def record(rec: dict) -> None:
            rec["at"] = round(time.time(), 3)  # wall-clock time the step ended
            trace.append(rec)
            if sink is not None:
                sink.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                sink.flush()

        answer, reason, error = "", "max_steps", None
        ptok = ctok = steps = 0
        try:
            for step in range(1, self.max_steps + 1):
                steps = step
                yield AgentEvent("step", step)
                start, turn = time.perf_counter(), None
                try:
                    for item in self.model.stream(messages, decls, self._choice(step) if decls else "none"):
                        if isinstance(item, ModelTurn):
                            turn = item
                        elif item:
                            yield AgentEvent("delta", step, text=item)
                    if turn is None:
                        raise RuntimeError("the model backend returned no turn")
                except Exception as err:  # noqa: BLE001 - the loop ends with a reason, not a traceback
                    reason, error = "model_error", f"{type(err).__name__}: {err}"
                    answer = f"Stopped: the model failed at step {step}: {error}"
                    record({"type": "model", "step": step, "seconds": round(time.perf_counter() - start, 6),
                            "error": error})
                    break
                ptok += turn.prompt_tokens
                ctok += turn.completion_tokens
                rec = {"type": "model", "step": step, "seconds": round(time.perf_counter() - start, 6),
                       "prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
                       "finish_reason": turn.finish_reason, "content": turn.content,
                       "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.calls]}
                if turn.prefill_seconds is not None:
                    rec.update(prefill_seconds=round(turn.prefill_seconds, 6),
                               decode_seconds=round(turn.decode_seconds or 0.0, 6), cached_tokens=turn.cached_tokens)
                record(rec)
                if not turn.calls:
                    answer, reason = turn.content, "answer"
                    break
                messages.append({"role": "assistant", "content": turn.content or None, "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name or "unknown", "arguments": history_arguments(c)}}
                    for c in turn.calls]})
                for c in turn.calls:
                    yield AgentEvent("tool_call", step, call=c)
                results = (run_calls(turn.calls, self._tools) if self.parallel_tools
                           else [r for c in turn.calls for r in run_calls([c], self._tools)])
                for r in results:
                    messages.append({"role": "tool", "tool_call_id": r.call.id, "content": r.content})
                    record({"type": "tool", "step": step, "id": r.call.id, "name": r.call.name,
                            "arguments": r.call.arguments, "seconds": round(r.seconds, 6),
                            "result": r.content if r.error is None else None, "error": r.error})
                    yield AgentEvent("tool_result", step, call=r.call, tool_result=r)
            else:
                answer = STOPPED.format(n=self.max_steps)
            if reason == "answer":
                messages.append({"role": "assistant", "content": answer})
                record({"type": "answer", "step": steps, "content": answer})
            else:
                record({"type": "stop", "step": steps, "reason": reason, "message": answer})
            yield AgentEvent("final", steps, text=answer, result=AgentResult(
                answer, reason, steps, messages, trace, ptok, ctok, error))
        finally:
            if sink is not None:
                sink.close()
