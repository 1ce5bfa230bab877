"""Tools for the agent loop: typed Python functions → OpenAI tool declarations (JSON Schema via pydantic), arguments
validated before the call, calls run on threads with a timeout, every failure turned into a tool result.

A tool is a plain function with type hints and a Google-style docstring::

    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict:
        \"\"\"Current weather in a city.

        Args:
            city: The city's name.
            unit: Temperature unit.
        \"\"\"

``FunctionTool.from_function(get_weather)`` gives its schema (the first docstring paragraph is the description,
``Args:`` lines describe the parameters).  ``run_calls`` runs a turn's calls concurrently and never raises: a bad
name, arguments that fail validation (the field is named), an exception, a timeout or a result that is not
JSON-serialisable each come back as an error result the model reads.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import pydantic
from pydantic_core import PydanticSerializationError, to_jsonable_python

from lmforge.serve.tools import NAME_RE, ToolError, parse_tools

_ARGS_HEAD = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """``(description, {parameter: description})`` from a Google-style docstring (``Args:`` section)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    desc: list[str] = []
    for line in lines:
        if not line.strip() or _ARGS_HEAD.match(line):
            break
        desc.append(line.strip())
    params: dict[str, str] = {}
    in_args, indent, current = False, None, None
    for line in lines:
        if _ARGS_HEAD.match(line):
            in_args, indent, current = True, None, None
            continue
        if not in_args or not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if width == 0:  # the next section (Returns:, Raises:)
            in_args = False
            continue
        m = _ARG_LINE.match(line)
        if m and (indent is None or width <= indent):
            indent, current = width, m.group(1).lstrip("*")
            params[current] = m.group(2).strip()
        elif current:
            params[current] = (params[current] + " " + line.strip()).strip()
    return " ".join(desc), params


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


@dataclass
class FunctionTool:
    """One callable tool: its name, description, pydantic arguments model and JSON Schema, and a timeout."""

    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[pydantic.BaseModel] | None
    timeout: float = 30.0
    schema: dict | None = None  # a tool declared by JSON Schema (an MCP server's): validated with jsonschema

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                      timeout: float = 30.0) -> "FunctionTool":
        name = name or fn.__name__
        if not NAME_RE.match(name):
            raise ValueError(f"tool name {name!r} must be 1-64 characters of a-z, A-Z, 0-9, _ . -")
        doc_desc, arg_docs = parse_docstring(fn.__doc__)
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as err:  # noqa: BLE001 - an unresolvable annotation
            raise ValueError(f"tool {name!r}: cannot resolve its type hints: {err}") from None
        fields: dict[str, Any] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ValueError(f"tool {name!r}: *args / **kwargs parameters cannot be described to a model")
            ann = hints.get(p.name, Any)
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (ann, pydantic.Field(default, description=arg_docs.get(p.name)))
        model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
        tool = cls(name, description if description is not None else doc_desc, fn, model, timeout)
        parse_tools([tool.to_openai()])  # the schema must be one constrained decoding can enforce
        return tool

    @classmethod
    def from_schema(cls, name: str, description: str, parameters: dict, fn: Callable[..., Any],
                    timeout: float = 30.0) -> "FunctionTool":
        """A tool declared by a JSON Schema (``fn`` gets the validated arguments as keywords); the schema must be
        one constrained decoding can enforce (``ValueError`` naming the keyword otherwise)."""
        import jsonschema

        try:
            parse_tools([{"type": "function", "function": {"name": name, "parameters": parameters}}])
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except (ToolError, jsonschema.SchemaError) as err:
            raise ValueError(f"tool {name!r}: {getattr(err, 'message', err)}") from None
        return cls(name, description, fn, None, timeout, schema=parameters)

    @property
    def parameters(self) -> dict:
        if self.schema is not None:
            return self.schema
        assert self.args_model is not None
        return _strip_titles(self.args_model.model_json_schema())

    def validate(self, raw: dict) -> dict:
        """The keyword arguments for ``fn`` from the model's JSON object; ``ValueError`` naming each bad field."""
        if self.schema is not None:
            import jsonschema

            errors = sorted(jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(raw),
                            key=lambda e: list(e.absolute_path))
            if errors:
                raise ValueError(f"invalid arguments for tool '{self.name}': " + "; ".join(
                    f"field '{'.'.join(str(x) for x in e.absolute_path) or '(arguments)'}': {e.message}"
                    for e in errors))
            return raw
        assert self.args_model is not None
        try:
            parsed = self.args_model.model_validate(raw)
        except pydantic.ValidationError as err:
            raise ValueError(_format_validation(self.name, err)) from None
        return {k: getattr(parsed, k) for k in self.args_model.model_fields}

    def to_openai(self) -> dict:
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float = 30.0) -> Any:
    """Decorator: ``@tool`` or ``@tool(timeout=5)`` turns a function into a :class:`FunctionTool`."""
    def wrap(f: Callable[..., Any]) -> FunctionTool:
        return FunctionTool.from_function(f, name=name, description=description, timeout=timeout)

    return wrap(fn) if fn is not None else wrap


def as_tool(obj: Any) -> FunctionTool:
    return obj if isinstance(obj, FunctionTool) else FunctionTool.from_function(obj)


@dataclass
class Call:
    """A tool call as the model made it: ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str
    complete: bool = True  # False: cut off (max_tokens) before its arguments ended


@dataclass
class CallResult:
    call: Call
    content: str  # what goes back to the model in the tool message (JSON text)
    error: str | None = None  # None: the tool ran and returned a value
    seconds: float = 0.0
    value: Any = field(default=None, repr=False)


def history_arguments(call: Call) -> str:
    """The arguments to keep in the conversation: the model's text when it is a JSON object, else ``{}`` (a cut-off
    or malformed call; the tool result explains what was wrong)."""
    try:
        ok = call.complete and isinstance(json.loads(call.arguments or "{}"), dict)
    except ValueError:
        ok = False
    return (call.arguments or "{}") if ok else "{}"


def error_content(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def _format_validation(name: str, err: pydantic.ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(arguments)"
        parts.append(f"field '{loc}': {e['msg']}")
    return f"invalid arguments for tool '{name}': " + "; ".join(parts)


def prepare(call: Call, tools: dict[str, FunctionTool]) -> tuple[FunctionTool, dict] | str:
    """The tool and its validated keyword arguments, or an error message."""
    if not call.complete:
        return (f"the call of tool '{call.name or '?'}' was cut off before its arguments ended "
                "(the model reached max_tokens or the end of its context)")
    t = tools.get(call.name)
    if t is None:
        return f"unknown tool '{call.name}' (available: {', '.join(tools) or 'none'})"
    try:
        raw = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError:
        return f"invalid arguments for tool '{call.name}': not JSON: {call.arguments[:200]!r}"
    if not isinstance(raw, dict):
        return f"invalid arguments for tool '{call.name}': expected a JSON object, got {type(raw).__name__}"
    try:
        return t, t.validate(raw)
    except ValueError as err:
        return str(err)


def run_calls(calls: list[Call], tools: dict[str, FunctionTool]) -> list[CallResult]:
    """Run ``calls`` concurrently (one daemon thread each, so a hung tool never blocks the loop or the process exit),
    each bounded by its tool's timeout; results in the order of the calls.  Never raises."""
    results: list[CallResult | None] = [None] * len(calls)
    threads: list[tuple[int, threading.Thread, float, FunctionTool]] = []
    for i, call in enumerate(calls):
        ready = prepare(call, tools)
        if isinstance(ready, str):
            results[i] = CallResult(call, error_content(ready), ready)
            continue
        t, kwargs = ready
        box: dict[str, Any] = {}

        def target(t=t, kwargs=kwargs, box=box) -> None:
            try:
                box["value"] = t.fn(**kwargs)
            except BaseException as err:  # noqa: BLE001 - any failure is the model's to read
                box["error"] = f"{type(err).__name__}: {err}"

        th = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
        start = time.perf_counter()
        th.start()
        threads.append((i, th, start, t))
        results[i] = CallResult(call, "", value=box)  # box filled by the thread
    for i, th, start, t in threads:
        th.join(max(0.0, start + t.timeout - time.perf_counter()))
        res = results[i]
        assert res is not None
        box = res.value
        res.seconds = time.perf_counter() - start
        res.value = None
        if th.is_alive():
            res.error = f"tool '{t.name}' timed out after {t.timeout:g} s"
        elif "error" in box:
            res.error = f"tool '{t.name}' raised {box['error']}"
        else:
            res.value = box.get("value")
            if isinstance(res.value, str):
                res.content = res.value
            else:
                try:
                    res.content = json.dumps(to_jsonable_python(res.value), ensure_ascii=False)
                except (PydanticSerializationError, TypeError, ValueError):
                    res.error = (f"tool '{t.name}' returned a value that is not JSON-serialisable "
                                 f"({type(res.value).__name__})")
        if res.error:
            res.content = error_content(res.error)
    return [r for r in results if r is not None]
