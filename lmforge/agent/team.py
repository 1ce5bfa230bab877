"""Role-playing teams (MetaGPT-style): roles with their own system prompt, standard operating procedure (SOP) steps and
tools take turns on a shared message log; each turn ends with one structured message whose JSON Schema is the role's
(``post_message``, a tool call the model must make — grammar-constrained on the in-process engine), until a stop
condition holds or ``max_rounds`` is reached.

A team (YAML, ``examples/teams/``)::

    name: kb-answer
    roles:
      - name: analyst
        goal: find what the knowledge base says
        sop:
          - {call: search_knowledge_base, arguments: {query: "{task}"}}   # the team runs it, the model reads it
          - Post the facts you found, each with its source number.
        message: {type: object, properties: {facts: {type: array, items: {type: string}}}, required: [facts]}
      - name: writer ...
      - name: reviewer
        message: {type: object, properties: {verdict: {enum: [approve, revise]}, comments: {type: string}},
                  required: [verdict, comments]}
    repeat_from: writer                 # later rounds start here (the writer revises, the reviewer reviews again)
    stop: {role: reviewer, field: verdict, equals: approve}
    max_rounds: 3

An SOP step is either an instruction to the role's model (a string) or a tool call the team makes itself at the start
of the role's turn (``{call: TOOL, arguments: {...}}``; ``{task}`` in a string argument is replaced by the team's task).
Its result reaches the model as the result of a call in its conversation — data, as every tool result — so a step
whose arguments must not depend on the model (a retrieval with the question as the query) does not.  ``tools`` are the
ones the model may call on its own.

**Quotes.** ``{x-quote: TOOL}`` anywhere in a role's message schema stands for one sentence, verbatim, of a passage
that TOOL returned to one of the role's SOP call steps in this turn, with that passage's number: at the start of the
turn it becomes ``{"source": <a passage's number>, "quote": <one of its sentences>}`` (an ``anyOf`` over the
passages, each an ``enum`` of its sentences; the number comes first, so decoding picks a passage, then a sentence), so constrained decoding can only post text the knowledge base holds,
cited to the passage it came from — extraction a small model gets right where free text copies the question::

    message: {type: object, properties: {facts: {type: array, maxItems: 3, items: {x-quote: search_knowledge_base}}}}

Every model call, tool call and message is recorded (``trace``, ``OUT/trace.jsonl`` with the role on each record), so
``lmforge agent trace OUT`` prints the team's run as a tree.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable

from pydantic import Discriminator, Field, Tag

from lmforge.agent.backends import ModelBackend
from lmforge.agent.loop import Agent
from lmforge.agent.tools import Call, FunctionTool, as_tool, prepare, run_calls
from lmforge.config import ConfigError, StageConfig, read_yaml, validate

POST = "post_message"
TASK = "{task}"
QUOTE = "x-quote"
NOTHING_FOUND = "(the search found no passage)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")
_MARKDOWN = re.compile(r"^\s*(?:[-*+]\s+|\d+[.)]\s+|>\s*)")


def sentences(text: str, max_chars: int = 300) -> list[str]:
    """The sentences of a passage, in order, without repeats.  Lines are joined into paragraphs (a blank line, a
    markdown heading or a list item starts a new one; headings are left out, list and quote marks dropped), and
    paragraphs split after . ! ? (and 。！？).  Fragments of fewer than 3 characters are left out and a sentence
    longer than ``max_chars`` is cut there (a quote must fit a message)."""
    blocks: list[str] = []
    current: list[str] = []
    for line in text.splitlines() + [""]:
        starts_item = bool(_MARKDOWN.match(line))
        if not line.strip() or line.lstrip().startswith("#") or starts_item:
            if current:
                blocks.append(" ".join(current))
            current = []
        if line.strip() and not line.lstrip().startswith("#"):
            current.append(_MARKDOWN.sub("", line).strip())
    out: list[str] = []
    for block in blocks:
        for piece in _SENTENCE_END.split(block):
            piece = piece.strip()[:max_chars]
            if len(piece) >= 3 and piece not in out:
                out.append(piece)
    return out


def passages(content: str) -> list[tuple[int, str]]:
    """(source number, text) of each passage in a tool result: a JSON list of objects with ``text`` (and an integer
    ``source``, else their position from 1), as ``search_knowledge_base`` returns; any other result is one passage,
    number 1."""
    try:
        data = json.loads(content)
    except (TypeError, ValueError):
        data = None
    if isinstance(data, list) and all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in data):
        return [(d["source"] if isinstance(d.get("source"), int) else i, d["text"]) for i, d in enumerate(data, 1)]
    return [(1, content)] if content else []


def quote_schema(found: list[tuple[int, str]]) -> dict:
    """The schema ``{x-quote: TOOL}`` becomes for passages ``found``: one of their sentences and its passage number."""
    # the passage number first: decoding picks a passage (the search ranks them), then one of its sentences
    options = [{"type": "object", "properties": {"source": {"const": n}, "quote": {"enum": sents}},
                "required": ["source", "quote"]} for n, text in found if (sents := sentences(text))]
    if not options:
        options = [{"type": "object", "properties": {"source": {"const": 0}, "quote": {"const": NOTHING_FOUND}},
                    "required": ["source", "quote"]}]
    return options[0] if len(options) == 1 else {"anyOf": options}


def expand_quotes(schema: Any, found: dict[str, list[tuple[int, str]]]) -> Any:
    """``schema`` with each ``{x-quote: TOOL}`` replaced by ``quote_schema`` of the passages TOOL returned (``found``)."""
    if isinstance(schema, dict):
        if QUOTE in schema:
            return quote_schema(found.get(schema[QUOTE], []))
        return {k: expand_quotes(v, found) for k, v in schema.items()}
    if isinstance(schema, list):
        return [expand_quotes(v, found) for v in schema]
    return schema


def quoted_tools(schema: Any) -> list[str]:
    """The tools ``{x-quote: TOOL}`` names in ``schema``."""
    if isinstance(schema, dict):
        if QUOTE in schema:
            return [str(schema[QUOTE])]
        return [t for v in schema.values() for t in quoted_tools(v)]
    if isinstance(schema, list):
        return [t for v in schema for t in quoted_tools(v)]
    return []


class CallStep(StageConfig):
    """An SOP step the team runs itself: ``call`` a tool with ``arguments`` (``{task}`` in a string: the task)."""

    call: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    def bound(self, task: str) -> dict[str, Any]:
        """``arguments`` with ``{task}`` replaced by ``task`` in every string (nested lists and objects too)."""
        def sub(v: Any) -> Any:
            if isinstance(v, str):
                return v.replace(TASK, task)
            if isinstance(v, list):
                return [sub(x) for x in v]
            if isinstance(v, dict):
                return {k: sub(x) for k, x in v.items()}
            return v

        return sub(self.arguments)

    def describe(self, task: str) -> str:
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in self.bound(task).items())
        return f"The team called {self.call}({args}) for you; its result is in this conversation."


def _step_kind(v: Any) -> str | None:
    return "text" if isinstance(v, str) else "call" if isinstance(v, (dict, CallStep)) else None


SopStep = Annotated[Annotated[str, Tag("text")] | Annotated[CallStep, Tag("call")], Discriminator(
    _step_kind, custom_error_type="sop_step",
    custom_error_message="an SOP step is a string (an instruction) or {call: TOOL, arguments: {...}}")]


class RoleSpec(StageConfig):
    name: str
    goal: str = ""
    system_prompt: str = ""
    sop: list[SopStep] = Field(default_factory=list, description=(
        "The role's standard operating procedure, in order: instructions (strings) and tool calls the team runs "
        "itself before the model speaks ({call: TOOL, arguments: {...}}; {task} in an argument: the task)."))
    tools: list[str] = Field(default_factory=list, description="Tools the role's model may call.")

    @property
    def call_steps(self) -> list[CallStep]:
        return [s for s in self.sop if isinstance(s, CallStep)]
    message: dict = Field(default_factory=lambda: {"type": "object", "properties": {"content": {"type": "string"}},
                                                   "required": ["content"]},
                          description="JSON Schema of the message the role posts.")
    max_steps: int = Field(4, ge=1, le=20, description="Model calls per turn (tool calls, then the message).")


class StopSpec(StageConfig):
    role: str
    field: str
    equals: Any


class TeamSpec(StageConfig):
    """A team file (YAML); unknown keys are errors naming the file and key."""

    name: str
    roles: list[RoleSpec] = Field(min_length=1)
    repeat_from: str | None = None
    stop: StopSpec | None = None
    max_rounds: int = Field(3, ge=1, le=20)

    def tool_names(self) -> list[str]:
        """Every tool the team needs: the roles' ``tools`` and their SOP calls, in order of first use."""
        return list(dict.fromkeys(n for r in self.roles for n in [*r.tools, *(s.call for s in r.call_steps)]))


@dataclass
class TeamResult:
    log: list[dict]  # the shared message log: {"round", "role", "content": dict}
    stop_reason: str  # "stop_condition" | "max_rounds" | "role_failed"
    rounds: int
    trace: list[dict]
    error: str | None = None

    @property
    def final(self) -> dict | None:
        return self.log[-1]["content"] if self.log else None


@dataclass
class Team:
    spec: TeamSpec
    backend: ModelBackend
    tools: dict[str, FunctionTool | Any] = field(default_factory=dict)  # name -> tool the roles may use
    out_dir: str | Path | None = None
    backends: dict[str, ModelBackend] = field(default_factory=dict)  # per-role backends (default: ``backend``)

    def __post_init__(self) -> None:
        self.tools = {name: as_tool(t) for name, t in self.tools.items()}
        names = [r.name for r in self.spec.roles]
        if len(set(names)) != len(names):
            raise ValueError(f"team {self.spec.name!r}: two roles share a name")
        for r in self.spec.roles:
            missing = [t for t in r.tools if t not in self.tools]
            if missing:
                raise ValueError(f"role {r.name!r}: unknown tool(s) {', '.join(missing)} (available: "
                                 f"{', '.join(self.tools) or 'none'})")
            for t in quoted_tools(r.message):
                if t not in {s.call for s in r.call_steps}:
                    raise ValueError(f"role {r.name!r}: message schema: {QUOTE}: {t!r} is not a tool one of this "
                                     f"role's SOP call steps runs (quotes come from their results)")
            # a schema decoding can enforce, with quotes from a sample passage
            FunctionTool.from_schema(POST, "", expand_quotes(r.message, {t: [(1, "A sample sentence.")]
                                                                         for t in quoted_tools(r.message)}),
                                     lambda **kw: kw)
            for i, step in enumerate(r.sop, 1):
                if not isinstance(step, CallStep):
                    continue
                ready = prepare(Call("check", step.call, json.dumps(step.bound("task"))), self.tools)
                if isinstance(ready, str):
                    raise ValueError(f"role {r.name!r}: sop step {i}: {ready}")
        if self.spec.repeat_from is not None and self.spec.repeat_from not in names:
            raise ValueError(f"repeat_from: no role {self.spec.repeat_from!r}")
        if self.spec.stop is not None and self.spec.stop.role not in names:
            raise ValueError(f"stop.role: no role {self.spec.stop.role!r}")

    def _system(self, role: RoleSpec, task: str) -> str:
        others = ", ".join(r.name for r in self.spec.roles if r.name != role.name)
        parts = [f"You are the {role.name} of a team ({self.spec.name}; the others: {others or 'none'})."]
        if role.goal:
            parts.append(f"Your goal: {role.goal}")
        if role.system_prompt.strip():
            parts.append(role.system_prompt.strip())
        if role.sop:
            steps = [s.describe(task) if isinstance(s, CallStep) else s for s in role.sop]
            parts.append("Your procedure:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1)))
        parts.append(f"The team's task: {task}")
        parts.append(f"End your turn by calling {POST} with your message to the team.")
        return "\n\n".join(parts)

    @staticmethod
    def _log_text(log: list[dict]) -> str:
        if not log:
            return "The message log is empty: you are the first to speak."
        return "Messages so far:\n" + "\n".join(
            f"[round {m['round']}] {m['role']}: {json.dumps(m['content'], ensure_ascii=False)}" for m in log)

    def _turn(self, role: RoleSpec, task: str, log: list[dict], rnd: int, record) -> dict | str:
        """One role's turn: its message (a dict), or why it produced none."""
        posted: list[dict] = []

        def post(**message: Any) -> str:
            posted.append(message)
            return "posted"

        messages: list[dict] = [{"role": "user", "content": self._log_text(log)}]
        found: dict[str, list[tuple[int, str]]] = {}
        for k, step in enumerate(role.call_steps, 1):
            call = Call(f"sop-{rnd}-{role.name}-{k}", step.call, json.dumps(step.bound(task), ensure_ascii=False))
            [res] = run_calls([call], self.tools)
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]})
            messages.append({"role": "tool", "tool_call_id": call.id, "content": res.content})
            record({"type": "tool", "step": 0, "role": role.name, "round": rnd, "sop": True, "id": call.id,
                    "name": call.name, "arguments": call.arguments, "seconds": round(res.seconds, 6),
                    "result": res.content if res.error is None else None, "error": res.error})
            if res.error is None:
                found.setdefault(step.call, []).extend(passages(res.content))
        post_tool = FunctionTool.from_schema(POST, "Post your message to the team (ends your turn).",
                                             expand_quotes(role.message, found), post)
        tools = [self.tools[t] for t in role.tools] + [post_tool]
        agent = Agent(self.backends.get(role.name, self.backend), tools=tools, system=self._system(role, task),
                      max_steps=role.max_steps, tool_choice="required")
        stream = agent.stream(messages)
        try:
            for ev in stream:
                if ev.type == "tool_result" and ev.call.name == POST and ev.tool_result.error is None:
                    break
        finally:
            stream.close()
        for rec in agent.last_trace:
            rec.update(role=role.name, round=rnd)
            record(rec)
        if posted:  # the first valid message ends the turn; further post_message calls in that model turn are not sent
            return posted[0]
        return f"role {role.name!r} posted no valid message in {role.max_steps} model call(s)"

    def run(self, task: str) -> TeamResult:
        trace: list[dict] = []
        sink = None
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            sink = open(Path(self.out_dir) / "trace.jsonl", "a", encoding="utf-8")

        def record(rec: dict) -> None:
            rec.setdefault("at", round(time.time(), 3))
            trace.append(rec)
            if sink is not None:
                sink.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                sink.flush()

        log: list[dict] = []
        roles = self.spec.roles
        start = 0
        reason, error, rnd = "max_rounds", None, 0
        try:
            for rnd in range(1, self.spec.max_rounds + 1):
                for role in roles[start:]:
                    out = self._turn(role, task, log, rnd, record)
                    if isinstance(out, str):
                        reason, error = "role_failed", out
                        record({"type": "stop", "step": 0, "role": role.name, "round": rnd, "reason": reason,
                                "message": out})
                        return TeamResult(log, reason, rnd, trace, error)
                    log.append({"round": rnd, "role": role.name, "content": out})
                    record({"type": "message", "step": 0, "role": role.name, "round": rnd, "content": out})
                    s = self.spec.stop
                    if s is not None and role.name == s.role and out.get(s.field) == s.equals:
                        reason = "stop_condition"
                        record({"type": "stop", "step": 0, "round": rnd, "reason": reason,
                                "message": f"{s.role}.{s.field} == {s.equals!r}"})
                        return TeamResult(log, reason, rnd, trace)
                start = [r.name for r in roles].index(self.spec.repeat_from) if self.spec.repeat_from else 0
            record({"type": "stop", "step": 0, "round": rnd, "reason": reason,
                    "message": f"no stop condition after {self.spec.max_rounds} round(s)"})
            return TeamResult(log, reason, rnd, trace)
        finally:
            if sink is not None:
                sink.close()


def load_team(path: str | os.PathLike) -> TeamSpec:
    p = Path(path)
    return validate(TeamSpec, read_yaml(p), str(p))


def team_tools(names: Iterable[str], index: str | os.PathLike | None = None) -> dict[str, FunctionTool]:
    """The built-in tools a team file names (``calculator``; ``search_knowledge_base`` with ``index``)."""
    from lmforge.agent.builtin import calculator, knowledge_base_tool

    out: dict[str, FunctionTool] = {}
    for n in set(names):
        if n == "calculator":
            out[n] = FunctionTool.from_function(calculator)
        elif n == "search_knowledge_base":
            if index is None:
                raise ConfigError("a role uses search_knowledge_base: give --index DIR")
            out[n] = knowledge_base_tool(index)
    return out
