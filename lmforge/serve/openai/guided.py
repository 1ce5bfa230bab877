"""Structured-output request fields → one ``GrammarSpec`` (``lmforge.serve.structured``).

Accepted, on ``/v1/chat/completions`` and ``/v1/completions`` alike:

- OpenAI ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
- vLLM's extras (``extra_body`` in the openai client): ``guided_json`` (a schema), ``guided_regex``,
  ``guided_choice`` (a list of strings), ``guided_grammar`` (GBNF — ``root ::= ...`` — or Lark — ``start: ...``,
  told apart by ``::=``), and the newer ``structured_outputs`` object with one of ``json``, ``regex``, ``choice``,
  ``grammar``, ``json_object``.

At most one of them per request (a 400 names both otherwise).  Errors name the request field.
"""

from __future__ import annotations

from typing import Any

from lmforge.serve.openai.common import APIError
from lmforge.serve.structured import GrammarSpec


def _grammar(text: Any, param: str) -> GrammarSpec:
    if not isinstance(text, str) or not text.strip():
        raise APIError(400, f"{param} must be a non-empty grammar string", param=param)
    return GrammarSpec.grammar(text, "gbnf" if "::=" in text else "lark")


def _from_response_format(rf: dict) -> GrammarSpec | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise APIError(400, "response_format.json_schema.schema is required for type 'json_schema'",
                           param="response_format.json_schema.schema")
        return GrammarSpec.json_schema(js["schema"])
    raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format.type")


def _from_structured_outputs(so: dict) -> tuple[GrammarSpec, str]:
    makers = {"json": lambda v: GrammarSpec.json_schema(v), "regex": GrammarSpec.regex,
              "choice": GrammarSpec.choice, "grammar": lambda v: _grammar(v, "structured_outputs.grammar"),
              "json_object": lambda v: GrammarSpec.json_object()}
    given = [k for k in makers if so.get(k) not in (None, False)]
    unknown = sorted(set(so) - set(makers) - {"backend", "disable_fallback", "disable_any_whitespace",
                                                "disable_additional_properties", "whitespace_pattern"})
    if unknown:
        raise APIError(400, f"structured_outputs.{unknown[0]} is not supported (use one of {', '.join(makers)})",
                       param=f"structured_outputs.{unknown[0]}")
    if len(given) != 1:
        raise APIError(400, f"structured_outputs needs exactly one of {', '.join(makers)}, got "
                            f"{', '.join(given) or 'none'}", param="structured_outputs")
    return makers[given[0]](so[given[0]]), f"structured_outputs.{given[0]}"


def spec_from_request(req) -> tuple[GrammarSpec | None, str | None]:
    """``(spec, request field it came from)``, or ``(None, None)`` for unconstrained output."""
    found: list[tuple[GrammarSpec, str]] = []
    rf = getattr(req, "response_format", None)
    if rf:
        if not isinstance(rf, dict):
            raise APIError(400, "response_format must be an object", param="response_format")
        spec = _from_response_format(rf)
        if spec is not None:
            found.append((spec, "response_format"))
    if req.guided_json is not None:
        found.append((GrammarSpec.json_schema(req.guided_json), "guided_json"))
    if req.guided_regex is not None:
        found.append((GrammarSpec.regex(req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append((GrammarSpec.choice(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        found.append((_grammar(req.guided_grammar, "guided_grammar"), "guided_grammar"))
    if req.structured_outputs is not None:
        if not isinstance(req.structured_outputs, dict):
            raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
        found.append(_from_structured_outputs(req.structured_outputs))
    if len(found) > 1:
        raise APIError(400, f"give one output constraint per request, got {found[0][1]} and {found[1][1]}",
                       param=found[1][1])
    return found[0] if found else (None, None)
