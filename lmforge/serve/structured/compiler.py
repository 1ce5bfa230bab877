"""Compiling specs off the driving thread, with a cache.

``StructuredOutputs`` belongs to one engine (its tokenizer, vocab size and eos tokens).  ``compile(spec)`` returns a
``concurrent.futures.Future`` of the compiled grammar: a small thread pool checks and compiles the spec, and the result
is cached under a hash of (kind, spec, tokenizer id), so a schema sent again costs nothing.  The backends drop the
GIL while they compile, so the engine keeps stepping meanwhile.

How a request waits for its grammar: *before* it reaches the engine.  ``processor(spec)`` blocks the caller (not
the engine's driver) until the grammar is ready and ``await processor_async(spec)`` yields to the event loop; either
returns a fresh ``GrammarLogitsProcessor`` that goes into ``SamplingParams.logits_processors``.  So the engine's
queue only ever holds requests that can run, the scheduler needs no notion of "not ready", other streams never wait on
a compile, and a bad spec raises ``StructuredOutputError`` (a ``ValueError``: a 400 in the API) before the request is
queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from tokenizers import Tokenizer

from lmforge.serve.structured.backends import CompiledGrammar, GrammarBackend, make_backend
from lmforge.serve.structured.processor import GrammarLogitsProcessor
from lmforge.serve.structured.spec import GrammarSpec, normalize

DEFAULT_BACKEND = "llguidance"  # measured against xgrammar in bench/structured.py (docs/benchmarks.md)


def tokenizer_id(tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> str:
    """A stable id of everything a compiled grammar depends on besides the spec."""
    h = hashlib.sha256(tokenizer.to_str().encode())
    h.update(repr((vocab_size, sorted(eos_token_ids))).encode())
    return h.hexdigest()[:16]


class StructuredOutputs:
    """Grammar compilation and processors for one engine's tokenizer.

    >>> so = StructuredOutputs.for_engine(engine)
    >>> proc = so.processor(GrammarSpec.json_schema({"type": "object", "properties": {...}}))
    >>> engine.generate_text(prompt, SamplingParams(logits_processors=[proc]))
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], *,
                 backend: str | GrammarBackend = DEFAULT_BACKEND, max_workers: int = 2,
                 cache_size: int = 1024) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.backend = backend if not isinstance(backend, str) else \
            make_backend(backend, tokenizer, vocab_size, self.eos_token_ids)
        self.tokenizer_id = tokenizer_id(tokenizer, vocab_size, self.eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lmforge-grammar")
        self.compiles = 0  # grammars actually compiled (cache misses)

    @classmethod
    def for_engine(cls, engine, **kwargs) -> "StructuredOutputs":
        """For a ``lmforge.serve.engine.Engine``: its tokenizer, vocab size and eos tokens."""
        return cls(engine.tokenizer, engine.vocab_size, engine.eos_token_ids, **kwargs)

    def compile(self, spec: GrammarSpec) -> "Future[CompiledGrammar]":
        """The compiled grammar of ``spec``, from the cache or compiled on the pool.  The future raises
        ``StructuredOutputError`` for a bad spec (failures are not cached)."""
        key = spec.key(self.tokenizer_id)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f, key=key: f.exception() is not None and self._forget(key, f))
        return fut

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        self.compiles += 1
        return self.backend.compile(normalize(spec))

    def _forget(self, key: str, fut: Future) -> None:
        with self._lock:
            if self._cache.get(key) is fut:
                del self._cache[key]

    def make_processor(self, compiled: CompiledGrammar) -> GrammarLogitsProcessor:
        return GrammarLogitsProcessor(compiled.matcher(), self.vocab_size, self.eos_token_ids)

    def processor(self, spec: GrammarSpec, timeout: float | None = None) -> GrammarLogitsProcessor:
        """A fresh processor for one request; blocks this thread (never the engine) until the grammar is compiled."""
        return self.make_processor(self.compile(spec).result(timeout))

    async def processor_async(self, spec: GrammarSpec) -> GrammarLogitsProcessor:
        """``processor`` for asyncio code (the HTTP server): awaits the compile without blocking the event loop."""
        return self.make_processor(await asyncio.wrap_future(self.compile(spec)))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
