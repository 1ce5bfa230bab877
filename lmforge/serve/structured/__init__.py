"""Structured output: constrained decoding in the engine (JSON Schema, any JSON object, regex, choice, GBNF / Lark).

Engine-level API (the HTTP layer's ``response_format`` / ``guided_*`` / tools build on it)::

    from lmforge.serve.structured import GrammarSpec, StructuredOutputs

    so = StructuredOutputs.for_engine(engine)            # backend "llguidance" (default) or "xgrammar"
    proc = so.processor(GrammarSpec.json_schema(schema))  # compiled on a pool, cached; one processor per request
    engine.generate_text(prompt, SamplingParams(logits_processors=[proc]))

Modules: ``spec`` (what a request asks for, schema checks), ``backends`` (the ``GrammarBackend`` interface and the
xgrammar / llguidance implementations), ``compiler`` (cache + thread pool), ``processor`` (the bitmask logits
processor).
"""

from lmforge.serve.structured.backends import BACKENDS, CompiledGrammar, GrammarBackend, GrammarMatcher, make_backend
from lmforge.serve.structured.compiler import DEFAULT_BACKEND, StructuredOutputs
from lmforge.serve.structured.processor import GrammarLogitsProcessor, apply_bitmask
from lmforge.serve.structured.spec import GrammarSpec, StructuredOutputError, check_json_schema

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "CompiledGrammar", "GrammarBackend", "GrammarMatcher", "GrammarSpec",
           "GrammarLogitsProcessor", "StructuredOutputError", "StructuredOutputs", "apply_bitmask",
           "check_json_schema", "make_backend"]
