"""Grammar backends behind one small interface.

``GrammarBackend.compile(spec) -> CompiledGrammar``; ``CompiledGrammar.matcher() -> GrammarMatcher``; a matcher
fills a packed token bitmask (int32 words, bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed), accepts the
sampled token, says when the grammar has terminated, and can roll tokens back.

Two backends, measured on our vocabularies over all 3,154 BFCL parameter schemas (bench/structured.py, figures in
docs/benchmarks.md):

- ``llguidance`` (default): builds its parser in ~tens of ms, masks in a few us at the median; rejects JSON Schema
  keywords it cannot enforce by itself; no invalid output found.
- ``xgrammar``: ~3x slower to compile (it precomputes per-state token masks), ~16 us median mask; two bugs that
  emit invalid JSON (raw control characters in length-bounded strings; ``required`` names missing from
  ``properties`` dropped) are worked around here, and it silently ignores keywords (``uniqueItems``, ``oneOf``, ...),
  which spec.check_json_schema rejects before any backend sees them.

Both take regex, JSON Schema, GBNF (converted to Lark for llguidance) and Lark.  The end of the grammar is the
engine's eos token(s): once the grammar is complete, the mask allows those.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol, Sequence

import torch
from tokenizers import Tokenizer

from lmforge.serve.structured.spec import GrammarSpec, StructuredOutputError

log = logging.getLogger("lmforge.serve.structured")

BACKENDS = ("xgrammar", "llguidance")
KEY_SEPARATOR, ITEM_SEPARATOR = ": ", ", "


class GrammarMatcher(Protocol):
    """The per-request state of one compiled grammar."""

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask`` (int32, [ceil(vocab / 32)])."""

    def accept_token(self, token: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar does not allow it."""

    def is_terminated(self) -> bool:
        """True once an end token was accepted: nothing may follow."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""


class CompiledGrammar(Protocol):
    def matcher(self) -> GrammarMatcher: ...


class GrammarBackend(Protocol):
    name: str
    vocab_size: int

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a (normalized) spec; raise ``StructuredOutputError`` for a spec the backend rejects."""


def choice_gbnf(choices: Sequence[str]) -> str:
    """A GBNF grammar for exactly one of ``choices`` (JSON string escapes are valid GBNF/Lark literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def choice_lark(choices: Sequence[str]) -> str:
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# -- xgrammar ---------------------------------------------------------------------------------------------------------
# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (minLength / maxLength) as [^"\\\r\n], which
# lets raw control characters (U+0000-U+001F) through: invalid JSON (json.loads rejects it).  We swap in the class its
# other JSON strings use, without backslash escapes (a subset: still valid).  tests/test_structured.py checks it.
_LAX_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\"\\\\\\0-\\x1f]'


class _XGrammarMatcher:
    def __init__(self, compiled) -> None:
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        self._m.fill_next_token_bitmask(bitmask.view(1, -1))

    def accept_token(self, token: int) -> bool:
        return self._m.accept_token(token)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)


class _XGrammarCompiled:
    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def matcher(self) -> GrammarMatcher:
        return _XGrammarMatcher(self.compiled)


class XGrammarBackend:
    """xgrammar (Apache-2.0): a pushdown automaton with a per-state token-mask cache."""

    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        vocab = [""] * vocab_size
        for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if i < vocab_size:
                vocab[i] = text
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
        self.info = xgr.TokenizerInfo(vocab, vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                                      stop_token_ids=sorted(stop_token_ids), add_prefix_space=meta["add_prefix_space"])
        # our own cache sits above (keyed by spec + tokenizer); one thread per compile, the pool parallelises
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        import xgrammar as xgr

        c = self.compiler
        try:
            if spec.kind in ("json_schema", "json_object"):
                schema = spec.value if spec.kind == "json_schema" else {"type": "object"}
                grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                                       separators=(ITEM_SEPARATOR, KEY_SEPARATOR),
                                                       strict_mode=spec.kind == "json_schema")
                text = str(grammar)
                if _LAX_STRING_CHAR in text:  # see _LAX_STRING_CHAR
                    grammar = xgr.Grammar.from_ebnf(text.replace(_LAX_STRING_CHAR, _JSON_STRING_CHAR))
                out = c.compile_grammar(grammar)
            elif spec.kind == "tool_calls":
                from lmforge.serve.tools import rename_rule, tool_calls_grammar_text

                schema_json, allow_text, parallel = spec.value
                call = str(xgr.Grammar.from_json_schema(schema_json, any_whitespace=False,
                                                        separators=(ITEM_SEPARATOR, KEY_SEPARATOR), strict_mode=True))
                call = rename_rule(call.replace(_LAX_STRING_CHAR, _JSON_STRING_CHAR), "root", "tc_json")
                text = "\n".join(tool_calls_grammar_text("tc_json", allow_text, parallel)) + "\n" + call
                out = c.compile_grammar(xgr.Grammar.from_ebnf(text))
            elif spec.kind == "regex":
                out = c.compile_regex(spec.value)
            elif spec.kind == "choice":
                out = c.compile_grammar(xgr.Grammar.from_ebnf(choice_gbnf(spec.value)))
            elif spec.syntax == "lark":
                out = c.compile_lark(spec.value)
            else:
                out = c.compile_grammar(xgr.Grammar.from_ebnf(spec.value))
        except (RuntimeError, ValueError, TypeError) as err:
            raise StructuredOutputError(f"invalid {_what(spec)}: {_clean(err)}") from None
        return _XGrammarCompiled(out)


# -- llguidance -------------------------------------------------------------------------------------------------------
class _LLGuidanceMatcher:
    def __init__(self, matcher) -> None:
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def accept_token(self, token: int) -> bool:
        return self._m.consume_token(token) and not self._m.is_error()

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)


class _LLGuidanceCompiled:
    """A fresh matcher (the parser built from the grammar) kept as the prototype: each request gets a cheap copy."""

    def __init__(self, prototype) -> None:
        self.prototype = prototype

    def matcher(self) -> GrammarMatcher:
        return _LLGuidanceMatcher(self.prototype.deep_copy())


class LLGuidanceBackend:
    """llguidance (MIT): an Earley parser over a lexer; masks are computed lazily, nothing is precompiled."""

    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import llguidance as llg

        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=sorted(stop_token_ids))

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        import llguidance as llg
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            if spec.kind in ("json_schema", "json_object"):
                schema = _closed(spec.value) if spec.kind == "json_schema" else {"type": "object"}
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False, "key_separator": KEY_SEPARATOR,
                                      "item_separator": ITEM_SEPARATOR})
            elif spec.kind == "tool_calls":
                from lmforge.serve.tools import tool_calls_grammar_text

                schema_json, allow_text, parallel = spec.value
                schema = json.dumps({**_closed(json.loads(schema_json)), "x-guidance": {
                    "whitespace_flexible": False, "key_separator": KEY_SEPARATOR, "item_separator": ITEM_SEPARATOR}})
                grammar = llg.LLMatcher.grammar_from_lark(
                    "\n".join(tool_calls_grammar_text(f"%json {schema}", allow_text, parallel, lark=True)))
            elif spec.kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(spec.value)
            elif spec.kind == "choice":
                grammar = llg.LLMatcher.grammar_from_lark(choice_lark(spec.value))
            else:
                lark = spec.value if spec.syntax == "lark" else gbnf_to_lark(spec.value)
                grammar = llg.LLMatcher.grammar_from_lark(lark)
            is_err, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if not is_err:
                prototype = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
                if prototype.is_error():
                    is_err, messages = True, [prototype.get_error()]
        except Exception as err:  # noqa: BLE001 - the GBNF converter raises bare Exceptions
            raise StructuredOutputError(f"invalid {_what(spec)}: {_clean(err)}") from None
        if is_err:
            raise StructuredOutputError(f"invalid {_what(spec)}: {messages[0]}")
        return _LLGuidanceCompiled(prototype)


def make_backend(name: str, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> GrammarBackend:
    """A backend for one tokenizer; ``stop_token_ids`` (the engine's eos tokens) end every grammar."""
    if not stop_token_ids:
        raise ValueError("constrained decoding needs at least one eos token id")
    if name == "xgrammar":
        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    if name == "llguidance":
        return LLGuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"unknown grammar backend {name!r}; expected one of {BACKENDS}")


def _closed(schema):
    """``schema`` with ``additionalProperties: false`` wherever an object declares properties without saying (what
    xgrammar's strict mode does): outputs stay a subset of what the schema allows."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k not in ("enum", "const", "default", "examples") else v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def _what(spec: GrammarSpec) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object spec", "regex": "regex",
            "choice": "choice list", "tool_calls": "tool schema"}.get(spec.kind, f"{spec.syntax} grammar")


def _clean(err: Exception) -> str:
    """The backend's message without its C++ source location prefix."""
    msg = str(err).strip()
    if msg.startswith("[") and "] " in msg:  # "[15:03:06] /project/cpp/x.cc:123: message"
        msg = msg.split("] ", 1)[1]
        head, sep, rest = msg.partition(": ")
        if sep and (".cc:" in head or ".h:" in head):
            msg = rest
    return msg.splitlines()[0] if msg else type(err).__name__
