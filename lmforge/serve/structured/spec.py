"""What a constrained request asks for (``GrammarSpec``) and the checks a spec passes before any backend sees it.

Spec kinds:

- ``json_schema``: a JSON Schema (dict or JSON text).  Output is compact JSON (``", "`` / ``": "`` separators, no other
  whitespace) whose objects hold only the declared properties, in declared order (a subset of what the schema allows,
  so every output validates).
- ``json_object``: any JSON object (OpenAI's ``{"type": "json_object"}``).
- ``regex``: the whole output matches the regular expression (the backend's dialect: no look-around, no
  back-references).
- ``choice``: the output is exactly one of the given strings.
- ``tool_calls``: ``(call schema JSON, allow_text, parallel)``: function-call blocks, optionally after free text
  (``lmforge.serve.tools`` builds it from OpenAI ``tools`` / ``tool_choice``).
- ``grammar``: a context-free grammar, ``syntax="gbnf"`` (llama.cpp GBNF / xgrammar EBNF: ``root ::= ...``) or
  ``syntax="lark"`` (``start: ...``).

JSON Schema keywords: every *assertion* keyword the engine cannot enforce raises ``StructuredOutputError`` naming the
keyword and its JSON pointer in the schema, never silently ignored (vLLM ignores some).  Keywords outside the JSON
Schema vocabulary (e.g. BFCL's ``"optional"``) are annotations by the spec and ignored, as ``jsonschema`` does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

SpecKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "tool_calls"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls")
SYNTAXES: tuple[str, ...] = ("gbnf", "lark")


class StructuredOutputError(ValueError):
    """A spec that cannot be compiled: invalid schema, unresolvable ``$ref``, unsupported keyword, bad regex or
    grammar.  The API layer turns it into a 400 naming the request field."""


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint.  Build it with the class methods; ``value`` is the schema / pattern / choices / grammar."""

    kind: str
    value: Any = None
    syntax: str | None = None  # grammar kind only: "gbnf" or "lark"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(f"unknown structured-output kind {self.kind!r}; expected one of {KINDS}")

    @classmethod
    def json_schema(cls, schema: dict | str | bool) -> "GrammarSpec":
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> "GrammarSpec":
        return cls("choice", tuple(choices) if isinstance(choices, (list, tuple)) else choices)

    @classmethod
    def grammar(cls, text: str, syntax: str = "gbnf") -> "GrammarSpec":
        return cls("grammar", text, syntax)

    def key(self, tokenizer_id: str) -> str:
        """Cache key: a hash of (kind, canonical spec, syntax, tokenizer id)."""
        value = self.value
        if self.kind == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # checked (and rejected) at compile time
        blob = json.dumps([self.kind, value, self.syntax, tokenizer_id], sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()


def normalize(spec: GrammarSpec) -> GrammarSpec:
    """Check a spec's shape and, for JSON Schema, its content; returns it with a parsed (dict) schema."""
    if spec.kind == "json_schema":
        schema = spec.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as err:
                raise StructuredOutputError(f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError(f"a JSON schema must be an object, got {type(schema).__name__}")
        check_json_schema(schema)
        return GrammarSpec("json_schema", consistent_enums(schema))
    if spec.kind == "tool_calls":  # (JSON schema of one call, text allowed before the calls, several calls)
        schema_json, allow_text, parallel = spec.value
        schema = json.loads(schema_json)
        check_json_schema(schema)
        return GrammarSpec("tool_calls", (json.dumps(consistent_enums(schema)), allow_text, parallel))
    if spec.kind == "regex":
        if not isinstance(spec.value, str) or not spec.value:
            raise StructuredOutputError("a regex spec needs a non-empty pattern string")
    elif spec.kind == "choice":
        choices = spec.value
        if not isinstance(choices, (list, tuple)) or not choices or \
                not all(isinstance(c, str) and c for c in choices):
            raise StructuredOutputError("a choice spec needs a non-empty list of non-empty strings")
    elif spec.kind == "grammar":
        if not isinstance(spec.value, str) or not spec.value.strip():
            raise StructuredOutputError("a grammar spec needs a non-empty grammar string")
        if spec.syntax not in SYNTAXES:
            raise StructuredOutputError(f"grammar syntax must be one of {SYNTAXES}, got {spec.syntax!r}")
    return spec


# -- JSON Schema keywords ---------------------------------------------------------------------------------------------
# Assertion keywords the xgrammar and llguidance backends enforce (each checked with a violating and a conforming
# document in tests/test_structured.py); ``format`` only for FORMATS.
SUPPORTED_KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
# annotations: no effect on validity
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
                         "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
                         "contentSchema", "$vocabulary", "$dynamicAnchor"})
# every other keyword of JSON Schema 2020-12 / draft 7: an assertion the backends cannot enforce
UNSUPPORTED_KEYWORDS = frozenset({
    "allOf", "oneOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems", "unevaluatedProperties",
    "propertyNames", "additionalItems", "$dynamicRef", "$recursiveRef", "$recursiveAnchor",
})
FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                     "uri-reference", "uuid", "json-pointer"})
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def _pointer(path: list[str]) -> str:
    return "#" + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def _resolve(root: Any, ref: str, path: list[str]) -> Any:
    if not ref.startswith("#"):
        raise StructuredOutputError(f"$ref {ref!r} at {_pointer(path)} does not resolve: only references inside "
                                    f"the schema ('#/...') are supported")
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise StructuredOutputError(f"$ref {ref!r} at {_pointer(path)} does not resolve")
    return node


def check_json_schema(schema: dict | bool) -> None:
    """Raise ``StructuredOutputError`` for a schema that is not valid JSON Schema (2020-12 meta-schema), holds a
    ``$ref`` that does not resolve, or uses an assertion keyword the engine cannot enforce."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        where = _pointer([str(p) for p in err.absolute_path]) if err.absolute_path else "#"
        raise StructuredOutputError(f"invalid JSON Schema at {where}: {err.message}") from None

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise StructuredOutputError(f"a subschema must be an object or a boolean at {_pointer(path)}")
        if "pattern" in node and ("minLength" in node or "maxLength" in node):
            length = "minLength" if "minLength" in node else "maxLength"
            raise StructuredOutputError(f"'pattern' with {length!r} at {_pointer(path + [length])} is not supported by "
                                        f"constrained decoding (the grammar backend enforces the pattern and would "
                                        f"ignore the length): bound the length in the pattern, e.g. '^.{{1,200}}$'")
        for key, val in node.items():
            here = path + [key]
            if key in UNSUPPORTED_KEYWORDS:
                raise StructuredOutputError(f"JSON Schema keyword {key!r} at {_pointer(here)} is not supported by "
                                            f"constrained decoding (it cannot be enforced while generating)")
            if key == "format" and val not in FORMATS:
                raise StructuredOutputError(f"format {val!r} at {_pointer(here)} is not supported by constrained "
                                            f"decoding; supported: {', '.join(sorted(FORMATS))}")
            if key == "type":
                types = val if isinstance(val, list) else [val]
                bad = [t for t in types if t not in JSON_TYPES]
                if bad:
                    raise StructuredOutputError(f"unknown type {bad[0]!r} at {_pointer(here)}")
            if key == "$ref":
                _resolve(schema, val, here)
            elif key in ("properties", "patternProperties", "$defs", "definitions"):
                for name, sub in val.items():
                    walk(sub, here + [name])
            elif key in ("additionalProperties", "items"):
                if isinstance(val, list):  # draft-4 tuple form
                    raise StructuredOutputError(f"'items' as a list at {_pointer(here)} is draft-4 syntax; "
                                                f"use 'prefixItems'")
                walk(val, here)
            elif key in ("prefixItems", "anyOf"):
                for i, sub in enumerate(val):
                    walk(sub, here + [str(i)])

    walk(schema, [])


# keywords an enum / const value is checked against (the backends emit enum values verbatim)
_VALUE_KEYWORDS = ("type", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "minProperties", "maxProperties")


class _Unsatisfiable(Exception):
    pass


def _value_schema(node: dict, name: str, extra) -> dict | bool:
    """The schema a property ``name`` not in ``properties`` must satisfy: a matching patternProperties entry, else
    additionalProperties (``True`` / absent: any value)."""
    import re

    for pattern, sub in (node.get("patternProperties") or {}).items():
        if re.search(pattern, name):
            return sub
    return {} if extra is True else extra


def consistent_enums(schema: dict | bool) -> dict | bool:
    """``schema`` made safe for the backends, same meaning: every ``enum`` / ``const`` value that violates its sibling
    keywords removed (``{"type": "integer", "enum": ["dontcare"]}`` occurs in real tool schemas; the backends would
    emit "dontcare"), and ``required`` names missing from ``properties`` declared there (xgrammar 0.2.9 drops them
    and emits ``{}``).  An optional property or ``anyOf`` branch left with no value is dropped; anything else
    unsatisfiable raises ``StructuredOutputError``."""
    import jsonschema

    def fix(node, path: list[str]):
        if not isinstance(node, dict):
            return node
        out = dict(node)
        siblings = {k: node[k] for k in _VALUE_KEYWORDS if k in node}
        if siblings and ("enum" in node or "const" in node):
            check = jsonschema.Draft202012Validator(siblings, format_checker=jsonschema.FormatChecker())
            if "const" in node and not check.is_valid(node["const"]):
                raise _Unsatisfiable(_pointer(path + ["const"]))
            if "enum" in node:
                out["enum"] = [v for v in node["enum"] if check.is_valid(v)]
                if not out["enum"]:
                    raise _Unsatisfiable(_pointer(path + ["enum"]))
        missing = [n for n in node.get("required") or [] if n not in (node.get("properties") or {})]
        if missing:  # required but not declared: declare them, or the backends' closed objects could not hold them
            extra = node.get("additionalProperties", True)
            if extra is False:
                raise _Unsatisfiable(_pointer(path + ["required"]))
            node = dict(node, properties={**(node.get("properties") or {}),
                                          **{n: _value_schema(node, n, extra) for n in missing}})
            out["properties"] = node["properties"]
        if isinstance(node.get("properties"), dict):
            required = set(node.get("required") or [])
            props = {}
            for name, sub in node["properties"].items():
                try:
                    props[name] = fix(sub, path + ["properties", name])
                except _Unsatisfiable:
                    if name in required:
                        raise
            out["properties"] = props
        if isinstance(node.get("anyOf"), list):
            branches = []
            for i, sub in enumerate(node["anyOf"]):
                try:
                    branches.append(fix(sub, path + ["anyOf", str(i)]))
                except _Unsatisfiable:
                    pass
            if not branches:
                raise _Unsatisfiable(_pointer(path + ["anyOf"]))
            out["anyOf"] = branches
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out[key] = fix(node[key], path + [key])
        for key in ("$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                out[key] = {k: fix(v, path + [key, k]) for k, v in node[key].items()}
        if isinstance(node.get("prefixItems"), list):
            out["prefixItems"] = [fix(v, path + ["prefixItems", str(i)]) for i, v in enumerate(node["prefixItems"])]
        return out

    try:
        return fix(schema, [])
    except _Unsatisfiable as err:
        raise StructuredOutputError(f"no value satisfies the schema at {err}: every enum/const value there "
                                    f"violates its sibling keywords (e.g. 'type')") from None
