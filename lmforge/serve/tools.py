"""Function calling: OpenAI ``tools`` in, one documented tool-call format in the prompt, ``tool_calls`` out.

The format (Hermes / Qwen 2.5 style) is the one ``lmforge sft`` trains on and the one the grammar enforces:

- the tools are listed in the system message, one JSON object per line between ``<tools>`` and ``</tools>``, with
  the instruction to answer a call as below (``TOOLS_HEADER``);
- an assistant turn that calls tools is its text (possibly empty) followed by one block per call::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  (compact JSON, ``", "`` and ``": "`` separators, ``name`` first, blocks separated by one newline);
- a tool result is a user turn ``<tool_response>\\n...\\n</tool_response>``; consecutive results share one turn, in
  the order of the calls.

``render_messages`` turns an OpenAI conversation (``tools``, assistant ``tool_calls``, ``tool`` messages) into plain
``role``/``content`` messages that any chat template renders.  ``tool_call_grammar`` is the constraint for a
``tool_choice``: ``"auto"`` allows text that never contains ``<tool_call>`` optionally followed by calls,
``"required"`` and a named function allow calls only (one, or several with ``parallel_tool_calls``), each call's
``arguments`` valid against its function's ``parameters``.  ``ToolCallParser`` reads generated text back into
content and calls incrementally (streaming) and the non-streaming answer is the same parser fed all at once, so the
concatenated stream equals the non-streaming response by construction.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from lmforge.serve.structured.spec import GrammarSpec, StructuredOutputError, check_json_schema

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
TAG = "<tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


class ToolError(ValueError):
    """A bad ``tools`` / ``tool_choice`` / tool message; ``param`` names the request field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def to_openai(self) -> dict:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


def parse_tools(tools: Iterable[Any] | None) -> list[Tool]:
    """Validate OpenAI ``tools`` (dicts or pydantic models): ``type: function``, a valid unique name, a JSON Schema
    for ``parameters`` that constrained decoding can enforce.  Errors name the field (``tools[1].function.name``)."""
    out: list[Tool] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(tools or []):
        t = raw.model_dump(exclude_none=True) if hasattr(raw, "model_dump") else raw
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise ToolError(f"{where}: only tools of type 'function' are supported", f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function is required", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"{where}.function.name is required", f"{where}.function.name")
        if not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name {name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ . -",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name {name!r} duplicates tools[{seen[name]}]", f"{where}.function.name")
        seen[name] = i
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON Schema object", f"{where}.function.parameters")
        try:
            check_json_schema(params)
        except StructuredOutputError as err:
            raise ToolError(f"{where}.function.parameters: {err}", f"{where}.function.parameters") from None
        desc = fn.get("description") or ""
        out.append(Tool(name, desc if isinstance(desc, str) else str(desc), params))
    return out


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required"
    names: tuple[str, ...] = ()  # the functions a call may name (all tools, or the one named)


def parse_tool_choice(choice: Any, tools: list[Tool]) -> ToolChoice:
    """OpenAI ``tool_choice``: ``"none"``, ``"auto"`` (the default with tools), ``"required"`` or
    ``{"type": "function", "function": {"name": ...}}``, checked against ``tools``."""
    if hasattr(choice, "model_dump"):
        choice = choice.model_dump(exclude_none=True)
    names = tuple(t.name for t in tools)
    if choice is None:
        return ToolChoice("auto" if tools else "none", names)
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ToolError(f"tool_choice {choice!r} needs at least one tool in `tools`", "tool_choice")
        return ToolChoice(choice, names)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ToolError(f"tool_choice names the function {name!r}, which is not in `tools` "
                            f"({', '.join(names) or 'none given'})", "tool_choice.function.name")
        return ToolChoice("required", (name,))
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                    "{\"name\": ...}}", "tool_choice")


# -- prompt --------------------------------------------------------------------------------------------------------------
def format_call(name: str, arguments: Any) -> str:
    """One call block, exactly as the grammar produces it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ValueError(f"tool call arguments are not JSON: {arguments[:80]!r}") from None
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(", ", ": "))
    return CALL_OPEN + body + CALL_CLOSE


def tools_system_text(tools: list[Tool]) -> str:
    return TOOLS_HEADER.format(tools="\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools))


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(_get(p, "text") or "" for p in content)


def render_messages(messages: list[Any], tools: list[Tool], choice: ToolChoice | None = None) -> list[dict]:
    """Plain ``{"role", "content"}`` messages for any chat template: tools in the system message (unless
    ``tool_choice`` is ``"none"``), assistant ``tool_calls`` as call blocks, ``tool`` results as ``<tool_response>``
    user turns.  A ``tool`` message must answer a call made earlier in the conversation (``tool_call_id``)."""
    out: list[dict] = []
    open_calls: dict[str, str] = {}  # id -> function name, calls not answered yet
    for i, m in enumerate(messages):
        role = _get(m, "role")
        text = message_text(_get(m, "content"))
        calls = _get(m, "tool_calls") or []
        if role == "assistant" and calls:
            blocks = []
            for j, c in enumerate(calls):
                fn = _get(c, "function") or {}
                name, cid = _get(fn, "name"), _get(c, "id")
                if not name:
                    raise ToolError(f"messages[{i}].tool_calls[{j}].function.name is required",
                                    f"messages[{i}].tool_calls[{j}].function.name")
                try:
                    blocks.append(format_call(name, _get(fn, "arguments") or "{}"))
                except ValueError as err:
                    raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments: {err}",
                                    f"messages[{i}].tool_calls[{j}].function.arguments") from None
                if cid:
                    open_calls[cid] = name
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + "\n".join(blocks)})
        elif role == "tool":
            cid = _get(m, "tool_call_id")
            if not cid or cid not in open_calls:
                raise ToolError(f"messages[{i}].tool_call_id {cid!r} matches no earlier assistant tool call"
                                + (f" (open: {', '.join(open_calls)})" if open_calls else ""),
                                f"messages[{i}].tool_call_id")
            open_calls.pop(cid)
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            msg = {"role": "system" if role == "developer" else role, "content": text}
            name = _get(m, "name")
            if name:
                msg["name"] = name
            out.append(msg)
    for m in out:
        m.pop("_tool", None)
    if tools and (choice is None or choice.mode != "none"):
        header = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + header}
        else:
            out.insert(0, {"role": "system", "content": header})
    return out


# -- grammar -------------------------------------------------------------------------------------------------------------
def call_schema(tools: list[Tool], names: Iterable[str]) -> dict:
    """The JSON Schema of one call object: ``{"name": <one of names>, "arguments": <its parameters>}``."""
    wanted = set(names)
    alts = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
             "required": ["name", "arguments"], "additionalProperties": False}
            for t in tools if t.name in wanted]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def _literal(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid GBNF / Lark string literal for our tags


def _not_chars(exclude: str, lark: bool) -> str:
    cls = "[^" + "".join("\\" + c if c in "]\\^-/" else c for c in sorted(set(exclude))) + "]"
    return f"/{cls}/" if lark else cls


def text_without_tag_rules(lark: bool = False, prefix: str = "tc_text") -> list[tuple[str, str]]:
    """Grammar rules ``(name, body)`` (GBNF, or Lark with ``lark=True``) for any text that never contains
    ``<tool_call>``.  KMP over the tag: a text is a series of excursions from the start state back to it (a char
    other than ``<``, or ``<`` and a partial match that then breaks), then at most one unfinished prefix of the tag.
    Only ``<`` restarts a match, since the tag holds no other ``<``.  Repetition, not recursion, carries the text,
    so the matcher's stack stays shallow however long the answer is."""
    e, f = f"{prefix}_e", f"{prefix}_f"
    rules = [(prefix, f'({_not_chars("<", lark)} | "<" {e}1)* ("<" {f}1)?')]
    for k in range(1, len(TAG)):
        nxt = TAG[k]
        if k + 1 < len(TAG):  # the next tag char continues the partial match
            rules.append((f"{e}{k}", f'{_literal(nxt)} {e}{k + 1} | "<" {e}1 | {_not_chars(nxt + "<", lark)}'))
            rules.append((f"{f}{k}", f'({_literal(nxt)} {f}{k + 1} | "<" {f}1)?'))
        else:  # the last tag char would complete the tag: not allowed
            rules.append((f"{e}{k}", f'"<" {e}1 | {_not_chars(nxt + "<", lark)}'))
            rules.append((f"{f}{k}", f'("<" {f}1)?'))
    return rules


def tool_calls_grammar_text(json_rule: str, allow_text: bool, parallel: bool, lark: bool = False) -> list[str]:
    """The rules around one call's JSON (``json_rule``: a rule name, or Lark's ``%json {...}``): text then calls
    (``allow_text``) or calls only; one call or several separated by a newline (``parallel``)."""
    sep = ":" if lark else " ::="
    start = "start" if lark else "root"
    calls = 'tc_call ("\\n" tc_call)*' if parallel else "tc_call"
    lines = [f"{start}{sep} {'tc_text tc_calls?' if allow_text else 'tc_calls'}",
             f"tc_calls{sep} {calls}",
             f"tc_call{sep} {_literal(CALL_OPEN)} {json_rule} {_literal(CALL_CLOSE)}"]
    if allow_text:
        lines += [f"{name}{sep} {body}" for name, body in text_without_tag_rules(lark)]
    return lines


def rename_rule(ebnf: str, old: str, new: str) -> str:
    """Rename the rule ``old`` of an EBNF text (definition and references), leaving string literals and character
    classes alone."""
    out, i, n = [], 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and ebnf[j] != close:
                j += 2 if ebnf[j] == "\\" else 1
            out.append(ebnf[i:j + 1])
            i = j + 1
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (ebnf[j].isalnum() or ebnf[j] in "_-"):
                j += 1
            word = ebnf[i:j]
            out.append(new if word == old else word)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def tool_call_grammar(tools: list[Tool], choice: ToolChoice, parallel: bool = True) -> GrammarSpec | None:
    """The constraint for ``choice`` (``None`` for ``"none"``): a ``tool_calls`` grammar spec."""
    if choice.mode == "none" or not tools:
        return None
    return GrammarSpec("tool_calls", (json.dumps(call_schema(tools, choice.names)),  # key order = output order
                                      choice.mode == "auto", bool(parallel)))


# -- parsing -------------------------------------------------------------------------------------------------------------
# a call's head, complete once the first character of its arguments has arrived
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)', re.S)
_TAIL = "}" + CALL_CLOSE


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""
    complete: bool = False  # its closing tag was seen (False for a call cut off by max_tokens)


@dataclass
class ParseEvent:
    """A streaming increment: ``content`` text, or a call's start (``name`` and ``id`` set) / its ``arguments``."""

    content: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``token``."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolCallParser:
    """Reads ``[text] (<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>\\n?)*`` incrementally."""

    new_id: Any = field(default=lambda: "call_" + uuid.uuid4().hex[:24])
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    _buf: str = ""
    _ws: str = ""  # trailing whitespace of the content, held back
    _state: str = "text"  # text | head | args | between

    def feed(self, text: str) -> list[ParseEvent]:
        self._buf += text
        events: list[ParseEvent] = []
        while True:
            if self._state == "text":
                at = self._buf.find(TAG)
                if at < 0:
                    keep = _partial_suffix(self._buf, TAG)
                    emit, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    self._content(emit, events)
                    return events
                self._content(self._buf[:at], events)
                self._ws = ""
                self._buf, self._state = self._buf[at + len(TAG):], "head"
            elif self._state == "head":
                m = _HEAD.match(self._buf)
                if m is None:
                    return events
                name = json.loads(f'"{m.group(1)}"')
                call = ToolCall(len(self.calls), self.new_id(), name)
                self.calls.append(call)
                events.append(ParseEvent(index=call.index, id=call.id, name=name))
                self._buf, self._state = self._buf[m.end():], "args"
            elif self._state == "args":
                at = self._buf.find(_TAIL)
                if at < 0:
                    keep = _partial_suffix(self._buf, _TAIL)
                    self._args(self._buf[:len(self._buf) - keep], events)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return events
                self._args(self._buf[:at], events)
                self.calls[-1].complete = True
                self._buf, self._state = self._buf[at + len(_TAIL):], "between"
            else:  # between calls: an optional newline, then the next call
                stripped = self._buf.lstrip()
                if not stripped:
                    return events
                if stripped.startswith(TAG):
                    self._buf, self._state = stripped, "text"
                    continue
                if TAG.startswith(stripped):
                    return events
                self._buf, self._state = stripped, "text"  # text after calls (only without a grammar)

    def finish(self) -> list[ParseEvent]:
        """Flush what is held back at the end of the output (a cut-off call keeps its partial arguments)."""
        events: list[ParseEvent] = []
        if self._state == "text":
            self._content(self._buf, events, final=not self.calls)
        elif self._state == "args":
            self._args(self._buf, events)
        elif self._state == "head" and not self.calls:
            self._content(TAG + self._buf, events, final=True)
        self._buf = ""
        return events

    def _content(self, text: str, events: list[ParseEvent], final: bool = False) -> None:
        """Content is emitted up to its trailing whitespace, which waits for more text: whitespace between the text
        and a call is dropped, in streaming and in the whole answer alike."""
        text = self._ws + text
        body = text if final else text.rstrip()
        self._ws = text[len(body):]
        if body:
            self.content += body
            events.append(ParseEvent(content=body))

    def _args(self, text: str, events: list[ParseEvent]) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(ParseEvent(index=self.calls[-1].index, arguments=text))


def parse_tool_calls(text: str, new_id: Any = None) -> tuple[str | None, list[ToolCall]]:
    """``(content, calls)`` of a whole output: the streaming parser fed at once.  Content is ``None`` when there is
    none and there are calls (OpenAI's shape)."""
    p = ToolCallParser(new_id) if new_id else ToolCallParser()
    p.feed(text)
    p.finish()
    return (p.content or None) if p.calls else p.content, p.calls
