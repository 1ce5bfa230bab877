"""Chat data for supervised fine-tuning: read, validate, render with the chat template, mask the loss.

Two JSONL layouts are read, one record per line:

* OpenAI ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* Alpaca ``{"instruction": "...", "input": "...", "output": "...", "system": "..."}`` (``input``/``system`` optional)
* OpenAI function calling: ``{"tools": [...], "messages": [..., {"role": "assistant", "tool_calls": [...]},
  {"role": "tool", "tool_call_id": ..., "content": ...}, ...]}``.  Every call must name a tool of the record and its
  arguments must validate against that tool's ``parameters`` (JSON Schema); the conversation is rendered in the one
  tool-call format the server parses and constrains (``lmforge.serve.tools``): tools in the system message, calls as
  ``<tool_call>`` blocks inside the assistant turn (trained on), results as ``<tool_response>`` user turns (not).

Every record is validated (roles, user/assistant alternation, empty turns, types); a bad line raises
``ChatDataError("file:line: field: why")`` or, with ``on_error="skip"``, is counted under its reason in ``DataStats``.

``encode_conversation`` renders the messages with the tokenizer's jinja chat template (ChatML for lmforge tokenizers,
SmolLM2's own for SmolLM2) and labels exactly the tokens the model must learn to produce: each assistant message's
content and its end-of-turn marker (``mask="assistant"``), only the last assistant turn (``"last"``) or every token
(``"all"``).  Labels come back already shifted for next-token prediction (``labels[t]`` is the target of
``input_ids[t]``), so examples can be packed side by side without a target crossing a boundary.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from tokenizers import Tokenizer

from lmforge.tokenizer.bpe import CHAT_TEMPLATE, load_tokenizer

if TYPE_CHECKING:
    import torch

IGNORE = -100
ROLES = ("system", "user", "assistant")
MaskMode = Literal["assistant", "last", "all"]


class ChatDataError(ValueError):
    """A record that is not a valid conversation; the message starts with ``file:line``."""


SKIP_HINT = "--on-error skip (on_error: skip) drops such records and reports them"
EXAMPLES_PER_REASON = 3


@dataclass
class DataStats:
    """Counts of what a reader kept and skipped (by reason, with the first few ``file:line`` of each reason)."""

    lines: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append(where)

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "kept": self.kept, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "skipped_examples": dict(self.examples)}

    def summary(self, what: str, source: str | os.PathLike) -> str | None:
        """One line for the terminal when anything was skipped: how many of how many, per reason, where."""
        total = sum(self.skipped.values())
        if not total:
            return None
        reasons = ", ".join(f"{reason} {n} (e.g. {', '.join(self.examples.get(reason, []))})"
                            for reason, n in self.skipped.most_common())
        return f"skipped {total} of {self.lines} {what} in {source}: {reasons}"

    def report(self, what: str, source: str | os.PathLike) -> None:
        """Print ``summary`` (yellow) when records were skipped."""
        line = self.summary(what, source)
        if line:
            from rich.markup import escape

            from lmforge.progress import console

            console.print(f"[yellow]  {escape(line)}[/]", highlight=False)


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "file:line"


# ----------------------------------------------------------------------------------------------------------------------
# validation


def _check_text(value: Any, field_name: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ChatDataError(f"{where}: {field_name}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ChatDataError(f"{where}: {field_name}: empty text")
    return value


def validate_messages(messages: Any, where: str, field_name: str = "messages",
                      require_assistant_last: bool = True) -> list[dict[str, str]]:
    """Check an OpenAI-style message list; return it as plain ``{"role", "content"}`` dicts."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: {field_name}: expected a non-empty list of messages")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        f = f"{field_name}[{i}]"
        if not isinstance(msg, dict):
            raise ChatDataError(f"{where}: {f}: expected an object with role and content, got {type(msg).__name__}")
        if "role" not in msg:
            raise ChatDataError(f"{where}: {f}.role: missing")
        role = msg["role"]
        if role not in ROLES:
            raise ChatDataError(f"{where}: {f}.role: {role!r} is not one of {', '.join(ROLES)}")
        if "content" not in msg:
            raise ChatDataError(f"{where}: {f}.content: missing")
        content = _check_text(msg["content"], f"{f}.content", where)
        out.append({"role": role, "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    for i, msg in enumerate(body):
        idx = i + (len(out) - len(body))
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            why = "a system message may only come first" if msg["role"] == "system" else \
                "turns must alternate user, assistant, user, ..."
            raise ChatDataError(f"{where}: {field_name}[{idx}].role: expected {expected!r}, got {msg['role']!r} ({why})")
    if require_assistant_last and (not body or body[-1]["role"] != "assistant"):
        raise ChatDataError(f"{where}: {field_name}: the conversation must end with an assistant message")
    return out


def record_to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """An OpenAI ``messages`` record or an Alpaca ``instruction/input/output`` record as a validated message list."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "tools" in record or _uses_tools(record["messages"]):
            return tool_conversation(record, where)
        return validate_messages(record["messages"], where)
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ChatDataError(f"{where}: {key}: missing (Alpaca records need instruction and output)")
        instruction = _check_text(record["instruction"], "instruction", where)
        extra = _check_text(record.get("input", ""), "input", where, allow_empty=True)
        output = _check_text(record["output"], "output", where)
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _check_text(record["system"], "system", where)})
        messages.append({"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")})
        messages.append({"role": "assistant", "content": output})
        return messages
    raise ChatDataError(f"{where}: expected a 'messages' list or Alpaca 'instruction'/'output' fields, "
                        f"got keys {sorted(record)}")


def _uses_tools(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def tool_conversation(record: dict, where: str) -> list[dict[str, str]]:
    """A function-calling record as plain validated messages: tools and calls checked (``file:line: field: why``),
    then rendered in the served tool-call format."""
    import jsonschema

    from lmforge.serve.tools import ToolError, parse_tools, render_messages

    try:
        tools = parse_tools(record.get("tools") or [])
    except ToolError as err:
        raise ChatDataError(f"{where}: {err}") from None
    schemas = {t.name: t.parameters for t in tools}
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: messages: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatDataError(f"{where}: messages[{i}]: expected an object, got {type(m).__name__}")
        if m.get("role") not in (*ROLES, "tool"):
            raise ChatDataError(f"{where}: messages[{i}].role: {m.get('role')!r} is not one of "
                                f"{', '.join((*ROLES, 'tool'))}")
        for j, call in enumerate(m.get("tool_calls") or []):
            f = f"messages[{i}].tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not fn.get("name"):
                raise ChatDataError(f"{where}: {f}.function.name: missing")
            if fn["name"] not in schemas:
                raise ChatDataError(f"{where}: {f}.function.name: {fn['name']!r} is not one of the record's tools "
                                    f"({', '.join(schemas) or 'none'})")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError as err:
                raise ChatDataError(f"{where}: {f}.function.arguments: not JSON: {err}") from None
            try:
                jsonschema.validate(args, schemas[fn["name"]])
            except jsonschema.ValidationError as err:
                at = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in err.absolute_path)
                raise ChatDataError(f"{where}: {f}.function.arguments{at}: {err.message} (tool "
                                    f"{fn['name']!r})") from None
    try:
        rendered = render_messages(messages, tools)
    except ToolError as err:
        raise ChatDataError(f"{where}: {err}") from None
    return validate_messages(rendered, where)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any, ChatDataError | None]]:
    """``(where, record, error)`` for each non-blank line; ``error`` is set (and ``record`` None) for a non-JSON line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as err:
                yield where, None, ChatDataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})")


def read_conversations(path: str | os.PathLike, on_error: Literal["raise", "skip"] = "raise",
                       stats: DataStats | None = None) -> list[Conversation]:
    """All conversations of a chat JSONL file (OpenAI or Alpaca records, mixed freely)."""
    stats = stats if stats is not None else DataStats()
    out: list[Conversation] = []
    for where, record, error in read_jsonl(path):
        stats.lines += 1
        try:
            if error is not None:
                raise error
            out.append(Conversation(record_to_messages(record, where), where))
            stats.kept += 1
        except ChatDataError as err:
            if on_error == "raise":
                raise ChatDataError(f"{err}; {SKIP_HINT}") from None
            stats.skip("invalid_json" if error is not None else _reason(str(err)), where)
    return out


def _reason(message: str) -> str:
    """A short skip reason from an error message (``messages[1].content: empty text`` → ``empty_text``)."""
    tail = message.rsplit(": ", 1)[-1]
    return "_".join(tail.split("(")[0].split()[:3]).strip("_").lower() or "invalid"


# ----------------------------------------------------------------------------------------------------------------------
# rendering and loss masks


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus the jinja chat template from ``tokenizer_config.json``."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = tokenizer_config or {}
        template = self.config.get("chat_template") or CHAT_TEMPLATE
        if isinstance(template, list):  # HF allows [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()))
        self.template_source = template
        self._template = _compile(template)
        self.special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            val = self.config.get(key)
            self.special[key] = val.get("content") if isinstance(val, dict) else val

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ChatTokenizer":
        tok, cfg = load_tokenizer(folder)
        return cls(tok, cfg)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatDataError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def assistant_spans(tok: ChatTokenizer, messages: list[dict[str, str]], mode: MaskMode) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans the loss covers.

    An assistant span starts after the generation prompt (``<|im_start|>assistant\\n``) and runs to the end of that
    message's rendering, so it holds the content and the end-of-turn marker the model must learn to emit."""
    text = tok.render(messages)
    if mode == "all":
        return text, [(0, len(text))]
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = tok.render(messages[:i], add_generation_prompt=True)
        upto = tok.render(messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ChatDataError("the chat template does not render conversations prefix by prefix; "
                                "cannot locate assistant turns for the loss mask")
        spans.append((len(prompt), len(upto)))
    if mode == "last":
        spans = spans[-1:]
    return text, spans


@dataclass
class Example:
    """One tokenized conversation, shifted: ``labels[t]`` is the target for ``input_ids[t]`` (or ``IGNORE``)."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode_conversation(tok: ChatTokenizer, messages: list[dict[str, str]], mode: MaskMode = "assistant",
                        where: str = "") -> Example:
    text, spans = assistant_spans(tok, messages, mode)
    enc = tok.tokenizer.encode(text, add_special_tokens=False)
    ids = enc.ids
    labels = [IGNORE] * len(ids)
    for t, (start, _end) in enumerate(enc.offsets):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    return Example(input_ids=ids[:-1], labels=labels[1:], where=where)


def encode_file(tok: ChatTokenizer, path: str | os.PathLike, max_len: int, mode: MaskMode = "assistant",
                on_error: Literal["raise", "skip"] = "raise", stats: DataStats | None = None) -> list[Example]:
    """Read, validate and tokenize a chat JSONL file; conversations longer than ``max_len`` tokens are an error or a
    counted skip (``too_long``) by ``on_error``, as are conversations with no target token left."""
    stats = stats if stats is not None else DataStats()
    examples = []
    for conv in read_conversations(path, on_error, stats):
        ex = encode_conversation(tok, conv.messages, mode, conv.where)
        problem = None
        if len(ex.input_ids) > max_len:
            problem = ("too_long", f"{conv.where}: conversation is {len(ex.input_ids)} tokens, over seq_len {max_len}; "
                                   f"a larger --seq-len (seq_len) keeps it, {SKIP_HINT}")
        elif ex.n_target_tokens == 0:
            problem = ("no_target_tokens", f"{conv.where}: no token is trained on (mask {mode!r}); {SKIP_HINT}")
        if problem:
            if on_error == "raise":
                raise ChatDataError(problem[1])
            stats.kept -= 1
            stats.skip(problem[0], conv.where)
            continue
        examples.append(ex)
    return examples


# ----------------------------------------------------------------------------------------------------------------------
# batches of examples (sft, dpo and reward training share them)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where no loss
    segment_ids: torch.Tensor | None  # [B, T] for packed rows (0 = padding), else None

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packed: bool,
            seq_len: int | None = None) -> Batch:
    """Rows of example indices → padded tensors.  Packed rows get segment ids 1, 2, ... and 0 for padding."""
    import torch

    seqs = [[t for i in row for t in examples[i].input_ids] for row in rows]
    T = seq_len or max(len(s) for s in seqs)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    segs = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, 1):
            ex = examples[i]
            n = len(ex.input_ids)
            ids[r, at:at + n] = torch.tensor(ex.input_ids)
            labels[r, at:at + n] = torch.tensor(ex.labels)
            segs[r, at:at + n] = k
            at += n
    return Batch(ids, labels, segs if packed else None)


def pad_id_of(model_dir: str | os.PathLike, tok: ChatTokenizer | None = None) -> int:
    """The model's padding token id: ``pad_token_id``, else ``eos_token_id`` of its ``config.json``, else 0."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("pad_token_id", "eos_token_id"):
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0
