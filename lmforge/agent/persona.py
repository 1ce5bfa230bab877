"""Personas: an agent described by a YAML card — who it is, how it speaks, what it knows, which tools it may use, what
it refuses, what it remembers — served as ``model: "persona:<name>"`` over the OpenAI API (``lmforge serve
--persona CARD``).

A card (``examples/personas/``)::

    name: ava                          # served as persona:ava
    role: customer-service assistant of Lumen Outfitters
    style: friendly, brief, never promises what a policy does not say
    system_prompt: |
      Help customers with orders, returns and shipping.
    facts: ["The shop is in Lyon."]     # always in the prompt (an NPC's world facts)
    knowledge_base: kb-index            # a `lmforge rag index` folder (relative to the card): passages go in the prompt
    tools: [lookup_order, refund_order, confirm_refund, create_ticket, handoff_to_human, calculator]
    tools_module: tools.py              # defines tools(ctx) -> list of typed functions (ctx: PersonaContext)
    guardrails:
      rules: ["Never reveal another customer's order."]
      decline_topics: [python, javascript]     # a message naming one gets decline_message, no model call
      decline_message: "I can only help with Lumen orders."
      ungrounded: handoff                 # knowledge base has nothing above min_score: hand over (or: answer)
      tool_patterns: ['\\border\\b', '\\brefund']   # messages for the tools skip the grounding check
      handoff_message: "I'm passing you to a colleague."
    memory: {enabled: true, recall: 20}  # per-user SQLite memory of what the user said (the request's `user` field)

Guardrails that small models cannot be trusted with are enforced in code (declining, handing over); the rest goes
into the system prompt.  Every answer is an :class:`AgentResult` whose trace starts with the persona's own records
(guardrail decisions, retrieved passages, recalled memories).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field

from lmforge.agent.backends import ModelBackend
from lmforge.agent.loop import Agent, AgentEvent, AgentResult
from lmforge.agent.tools import FunctionTool, as_tool
from lmforge.config import ConfigError, StageConfig, read_yaml, validate

BUILTIN_TOOLS = ("calculator", "search_knowledge_base")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Guardrails(StageConfig):
    rules: list[str] = Field(default_factory=list, description="Rules added to the system prompt.")
    decline_topics: list[str] = Field(default_factory=list, description="Words or phrases (case-insensitive, whole "
                                      "words) that get decline_message without a model call.")
    decline_message: str = "Sorry, I can't help with that."
    ungrounded: Literal["answer", "handoff"] = Field("answer", description="With a knowledge base: what to do when "
                                                     "nothing in it scores min_score or more.")
    min_score: float = Field(0.3, ge=-1.0, le=1.0)
    tool_patterns: list[str] = Field(default_factory=list, description="Regexes: a message matching one is a "
                                     "request for a tool and skips the grounding check.")
    handoff_message: str = "I can't answer that from what I know; I'm handing you over to a human colleague."


class Memory(StageConfig):
    enabled: bool = False
    recall: int = Field(20, ge=1, le=200, description="Most earlier messages of the user put in the prompt.")


class PersonaCard(StageConfig):
    """A persona card (YAML); unknown keys are errors naming the file and key."""

    name: str
    role: str = ""
    style: str = ""
    system_prompt: str = ""
    facts: list[str] = Field(default_factory=list)
    knowledge_base: str | None = None
    k: int = Field(3, ge=1, le=10, description="Knowledge-base passages put in the prompt.")
    tools: list[str] = Field(default_factory=list)
    tools_module: str | None = None
    guardrails: Guardrails = Field(default_factory=Guardrails)
    memory: Memory = Field(default_factory=Memory)
    max_steps: int = Field(6, ge=1, le=50)
    tool_choice: Literal["auto", "first", "required"] = "auto"
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)


@dataclass
class PersonaContext:
    """What a persona's tools know about the request they serve (the argument of ``tools(ctx)``)."""

    persona: str
    state_dir: Path
    user: str = "anonymous"
    user_message: str = ""
    request_id: str = ""


class MemoryStore:
    """Per-user long-term memory in SQLite: every message a user sent a persona, with the conversation it came from."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS memory (persona TEXT, user TEXT, conversation TEXT, at REAL, "
                       "content TEXT)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, persona: str, user: str, conversation: str, content: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT INTO memory VALUES (?, ?, ?, ?, ?)", (persona, user, conversation, time.time(), content))

    def recall(self, persona: str, user: str, limit: int, exclude: set[str] = frozenset()) -> list[str]:
        """The user's most recent messages to this persona (oldest first), leaving out ``exclude`` (the ones in
        the conversation at hand)."""
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT content FROM memory WHERE persona = ? AND user = ? ORDER BY at DESC",
                              (persona, user)).fetchall()
        out: list[str] = []
        for (content,) in rows:
            if content not in exclude and content not in out:
                out.append(content)
            if len(out) >= limit:
                break
        return out[::-1]


def _home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".cache" / "lmforge")


class Persona:
    """A loaded persona card: its tools, knowledge base and memory; :meth:`stream` / :meth:`respond` answer a
    conversation with any model backend."""

    def __init__(self, card: PersonaCard, folder: Path, state_dir: Path | None = None, source: str = "") -> None:
        self.card = card
        self.folder = folder
        self.source = source or str(folder)
        self.state_dir = state_dir or _home() / "personas" / card.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kb = None
        if card.knowledge_base:
            from lmforge.rag.index import KnowledgeBase

            where = folder / card.knowledge_base
            if KnowledgeBase.live_version(where) is None:
                raise ConfigError(f"{self.source}: knowledge_base: no knowledge base at {where} (build it with "
                                  f"`lmforge rag index --docs DOCS --out {where}`)")
            self.kb = KnowledgeBase.load(where)
        self._factory: Callable[[PersonaContext], list[Any]] | None = None
        if card.tools_module:
            self._factory = self._load_factory(folder / card.tools_module)
        self.memory = MemoryStore(self.state_dir / "memory.sqlite") if card.memory.enabled else None
        self._decline = [re.compile(rf"(?<!\w){re.escape(t)}(?!\w)", re.I) for t in card.guardrails.decline_topics]
        try:
            self._tool_patterns = [re.compile(p, re.I) for p in card.guardrails.tool_patterns]
        except re.error as err:
            raise ConfigError(f"{self.source}: guardrails.tool_patterns: bad regex: {err}") from None
        if card.guardrails.ungrounded == "handoff" and self.kb is None:
            raise ConfigError(f"{self.source}: guardrails.ungrounded: 'handoff' needs a knowledge_base")
        self.tools_for(PersonaContext(card.name, self.state_dir))  # every named tool must exist: fail at load

    def _load_factory(self, path: Path) -> Callable[[PersonaContext], list[Any]]:
        if not path.is_file():
            raise ConfigError(f"{self.source}: tools_module: no file {path}")
        spec = importlib.util.spec_from_file_location(f"lmforge_persona_{self.card.name}_tools", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's module: one line naming it
            raise ConfigError(f"{self.source}: tools_module {path}: {type(err).__name__}: {err}") from None
        factory = getattr(module, "tools", None)
        if not callable(factory):
            raise ConfigError(f"{self.source}: tools_module {path} must define tools(ctx) returning the tool "
                              "functions")
        return factory

    @property
    def name(self) -> str:
        return self.card.name

    def tools_for(self, ctx: PersonaContext) -> list[FunctionTool]:
        """The card's tools, bound to this request."""
        from lmforge.agent.builtin import calculator, knowledge_base_tool

        available: dict[str, Any] = {"calculator": calculator}
        if self.kb is not None:
            available["search_knowledge_base"] = knowledge_base_tool(self.kb, k=self.card.k)
        if self._factory is not None:
            for fn in self._factory(ctx):
                t = as_tool(fn)
                available[t.name] = t
        out = []
        for i, name in enumerate(self.card.tools):
            if name not in available:
                raise ConfigError(f"{self.source}: tools[{i}]: unknown tool {name!r} (available: "
                                  f"{', '.join(sorted(available))})")
            out.append(as_tool(available[name]))
        return out

    # -- answering -----------------------------------------------------------------------------------------------------
    def system_prompt(self, passages: list[dict], memories: list[str], user: str, operator: str = "") -> str:
        c = self.card
        parts = [f"You are {c.name}" + (f", {c.role}" if c.role else "") + "."]
        if c.style:
            parts.append(f"Style: {c.style}")
        if c.system_prompt.strip():
            parts.append(c.system_prompt.strip())
        if c.facts:
            parts.append("Facts you know:\n" + "\n".join(f"- {f}" for f in c.facts))
        if c.guardrails.rules:
            parts.append("Rules:\n" + "\n".join(f"- {r}" for r in c.guardrails.rules))
        if passages:
            parts.append("Knowledge base passages (cite them as [n]):\n" + "\n".join(
                f"[{p['source']}] ({p['path']}) {p['text']}" for p in passages))
        if memories:
            parts.append(f"What {user} told you in earlier conversations:\n" + "\n".join(f"- {m}" for m in memories))
        if operator:
            parts.append(operator)
        return "\n\n".join(parts)

    def _canned(self, text: str, reason: str, records: list[dict], messages: list[dict]) -> AgentResult:
        records.append({"type": "answer", "step": 0, "content": text, "guardrail": reason})
        return AgentResult(text, "answer", 0, messages + [{"role": "assistant", "content": text}], records)

    def stream(self, messages: list[dict], backend: ModelBackend, user: str | None = None,
               conversation: str | None = None) -> Iterator[AgentEvent]:
        """Answer the conversation ``messages`` (OpenAI chat messages; the last one the user's) in character."""
        c = self.card
        user = user or "anonymous"
        request_id = uuid.uuid4().hex
        conversation = conversation or request_id
        chat = [m for m in messages if m.get("role") != "system"]
        operator = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
        if not chat or chat[-1].get("role") != "user" or not str(chat[-1].get("content") or "").strip():
            raise ValueError("the last message must be a non-empty user message")
        question = str(chat[-1]["content"])
        records: list[dict] = [{"type": "persona", "step": 0, "persona": c.name, "user": user}]
        if self.memory is not None:
            said = {str(m.get("content")) for m in chat if m.get("role") == "user"}
            memories = self.memory.recall(c.name, user, c.memory.recall, exclude=said)
            self.memory.add(c.name, user, conversation, question)
            if memories:
                records.append({"type": "memory", "step": 0, "recalled": memories})
        else:
            memories = []
        if any(p.search(question) for p in self._decline):
            yield AgentEvent("final", 0, text=c.guardrails.decline_message, result=self._canned(
                c.guardrails.decline_message, "declined", records, chat))
            return
        passages: list[dict] = []
        if self.kb is not None:
            hits = self.kb.search(question, k=c.k)
            best = max((float(h.dense_score) for h in hits), default=-1.0)
            passages = [{"source": i + 1, "path": h.chunk.path, "text": h.chunk.text,
                         "score": round(float(h.dense_score), 4)}
                        for i, h in enumerate(hits) if float(h.dense_score) >= c.guardrails.min_score]
            records.append({"type": "retrieval", "step": 0, "best_score": round(best, 4),
                            "passages": [{"path": p["path"], "score": p["score"]} for p in passages]})
            wants_tool = any(p.search(question) for p in self._tool_patterns)
            if not passages and c.guardrails.ungrounded == "handoff" and not wants_tool:
                ctx = PersonaContext(c.name, self.state_dir, user, question, request_id)
                handoff = next((t for t in self.tools_for(ctx) if t.name == "handoff_to_human"), None)
                if handoff is not None:  # record the hand-over in the business system, as the model would
                    from lmforge.agent.tools import Call, run_calls

                    args = json.dumps({"reason": f"no answer in the knowledge base: {question}"})
                    [res] = run_calls([Call("guardrail", handoff.name, args)], {handoff.name: handoff})
                    records.append({"type": "tool", "step": 0, "id": "guardrail", "name": handoff.name,
                                    "arguments": args, "seconds": round(res.seconds, 6),
                                    "result": res.content if res.error is None else None, "error": res.error})
                yield AgentEvent("final", 0, text=c.guardrails.handoff_message, result=self._canned(
                    c.guardrails.handoff_message, "ungrounded", records, chat))
                return
        ctx = PersonaContext(c.name, self.state_dir, user, question, request_id)
        system = self.system_prompt(passages, memories, user, operator)
        agent = Agent(backend, tools=self.tools_for(ctx), system=system, max_steps=c.max_steps,
                      tool_choice=c.tool_choice if self.card.tools else "auto")
        for ev in agent.stream(chat):
            if ev.type == "final" and ev.result is not None:
                ev.result.trace[:0] = records
            yield ev

    def respond(self, messages: list[dict], backend: ModelBackend, user: str | None = None,
                conversation: str | None = None) -> AgentResult:
        for ev in self.stream(messages, backend, user, conversation):
            if ev.type == "final":
                assert ev.result is not None
                return ev.result
        raise AssertionError("the persona stream ended without a final event")


def load_persona(path: str | os.PathLike, state_dir: str | os.PathLike | None = None,
                 state_root: str | os.PathLike | None = None) -> Persona:
    """Load and check a persona card (``ConfigError`` naming the file and key on any problem).  Its memory and tool
    data live in ``state_dir``, else ``state_root/<name>``, else ``$LMFORGE_HOME/personas/<name>``."""
    p = Path(path)
    card = validate(PersonaCard, read_yaml(p), str(p))
    if not NAME.match(card.name):
        raise ConfigError(f"{p}: name: {card.name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ . -")
    state = Path(state_dir) if state_dir else Path(state_root) / card.name if state_root else None
    return Persona(card, p.resolve().parent, state, source=str(p))


@dataclass
class PersonaSet:
    """The personas a server offers, by name."""

    personas: dict[str, Persona] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: list[str | os.PathLike], state_dir: str | os.PathLike | None = None) -> "PersonaSet":
        out = cls()
        for path in paths:
            p = load_persona(path, state_root=state_dir)
            if p.name in out.personas:
                raise ConfigError(f"{path}: name: a persona named {p.name!r} is already loaded")
            out.personas[p.name] = p
        return out
