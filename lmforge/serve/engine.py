"""The serving engine: model + tokenizer + a preallocated KV cache, driven by a scheduler step loop.

Requests are submitted from any thread (``add_request``) and land in a waiting queue.  One thread at a time, the
*driver*, runs ``Engine.step()`` while there is work (see "Who runs the steps" below); each step

1. retires aborted requests,
2. decodes one token for every running sequence in a single batched forward pass (rows of the batch sit at different
   positions, each in its own KV-cache slot),
3. admits waiting requests into free cache slots, first come first served, while the step's token budget lasts
   (``max_num_batched_tokens``: one token per decoding sequence plus the prompt tokens each admitted request still
   has to compute; at most ``max_prefill_tokens`` of them prompt tokens), and prefills them together in one padded
   forward pass, which yields their first tokens.

Prefix caching: a freed slot keeps its keys/values and the engine remembers which tokens they belong to.  An admitted
request takes the free slot whose remembered tokens share the longest prefix with its prompt (else the slot freed
longest ago); when a running sequence or another free slot shares a longer prefix, those positions are copied into
its slot.  Either way only the rest of the prompt is computed (at least its last token, for the first logits).  The
same system prompt or few-shot header is then computed once, not per request.

That is continuous batching at the granularity of a step: a request joins or leaves between any two steps.  The forward
pass is ``runner.ModelRunner`` (fused, bf16 or int8 weights); the cache is preallocated once.  Outputs go to a
per-request *sink* callable (a ``queue.Queue.put`` for sync callers, an asyncio hand-off for the API).

Who runs the steps.  PyTorch's CPU kernels run on OpenMP (libgomp).  Its parallel regions are fast while the threads
it manages are no more than the cores: then its helper threads spin between the ~2,000 small parallel regions of a
decode step instead of sleeping.  Every thread that ever ran parallel work keeps a pool, so a model loaded on the main
thread and served from a second thread crosses that line on a 2-core machine and decodes ~2x slower (SmolLM2-135M
int4: 100 tok/s on the main thread, 43 on a fresh thread).  The engine therefore computes on a thread that already
has a pool where it can: a caller blocked in ``generate()`` drives the engine itself when no one else does,
``run_forever()`` lets a server drive it from its main thread (``lmforge serve`` does), and ``embed()`` runs on the
driver too.  Only requests that arrive with no driver (``add_request`` from another thread) start a background
worker, which hands the role back after ``worker_idle_s`` seconds without work.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tokenizers import Tokenizer

from lmforge.model.hf import load_model
from lmforge.model.llama import KVCache, Llama
from lmforge.serve.detokenize import IncrementalDetokenizer, StopStringMatcher
from lmforge.serve.runner import ModelRunner
from lmforge.serve.sampling import LogitsProcessor, Sampled, SamplerState, SamplingParams, sample
from lmforge.serve.speculative import (DraftModelProposer, NgramProposer, SpecStats, SpeculativeConfig,
                                       load_draft_model, speculation_blocker, verify)
from lmforge.tokenizer.bpe import CHAT_TEMPLATE, load_tokenizer

__all__ = ["Engine", "SamplingParams", "LogitsProcessor", "GenerationOutput", "GenerationResult",
           "PromptTooLongError", "ChatTemplateError", "EngineError"]

log = logging.getLogger("lmforge.serve")

# end-of-turn tokens of common chat formats (ChatML, Llama 3, Phi-3); chat requests stop at whichever the vocab has
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # ChatML, Llama 3, Phi-3, Gemma


class PromptTooLongError(ValueError):
    """The prompt (plus the requested max_tokens) does not fit in the context window."""


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (e.g. via ``raise_exception``)."""


class EngineError(RuntimeError):
    """The engine failed while generating (a bug or an out-of-memory, not a bad request)."""


@dataclass
class GenerationOutput:
    """One increment of one request's output.  ``text`` / ``token_ids`` are new since the previous output."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[Sampled] | None = None  # one per token of ``token_ids`` when the request asked for logprobs
    speculative: dict | None = None  # on the last output, with speculation configured: SpecStats.as_dict()


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Sampled] | None = None
    speculative: dict | None = None


class EngineMetrics:
    """Hooks the engine calls (from its thread); the HTTP server plugs Prometheus counters in here."""

    def on_prompt(self, num_tokens: int) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_output_token(self, seconds: float) -> None: ...

    def on_finish(self, seq_prompt_tokens: int, completion_tokens: int, reason: str, e2e_seconds: float) -> None: ...

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None: ...

    def on_speculation(self, draft_tokens: int, accepted_tokens: int, emitted_tokens: int) -> None: ...

    def on_speculative_request(self, stats: dict) -> None: ...


Sink = Callable[[GenerationOutput], None]


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    max_tokens: int
    stop_token_ids: frozenset[int]
    sampler: SamplerState
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    output_ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)  # tokens not yet reported in an output
    unsent_logprobs: list[Sampled] = field(default_factory=list)
    arrival: float = 0.0
    last_token_time: float = 0.0
    slot: int | None = None
    num_cached: int = 0  # tokens whose keys/values are in the cache
    aborted: bool = False
    finished: bool = False
    spec: SpecStats | None = None  # with speculation configured; spec.enabled false: this request runs without

    @property
    def prefilled(self) -> bool:
        return bool(self.output_ids)


class Engine:
    """Owns a ``Llama`` model, its tokenizer and a ``KVCache`` with ``max_num_seqs`` slots of ``max_model_len``."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, tokenizer_config: dict | None = None, *,
                 max_num_seqs: int = 4, max_model_len: int | None = None,
                 generation_config: dict | None = None, dtype: str = "float32", quantize: str | None = None,
                 max_prefill_tokens: int = 4096, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, metrics: EngineMetrics | None = None,
                 prefill_chunk_size: int | None = 512, speculative: SpeculativeConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer_config = tokenizer_config or {}
        cfg = model.config
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max(max_prefill_tokens, self.max_model_len)
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        # tokens per step (decode + prompt); a prompt longer than it still runs once the batch has drained
        self.max_num_batched_tokens = max_num_batched_tokens or self.max_prefill_tokens + max_num_seqs
        self.enable_prefix_caching = enable_prefix_caching
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        # prompt tokens per step: a long prompt is prefilled over several steps, so running streams wait at most one
        # chunk between tokens (None: a whole prompt in one step)
        self.prefill_chunk_size = prefill_chunk_size or self.max_prefill_tokens
        self.runner = ModelRunner(model, dtype, quantize)
        self.device = self.runner.device
        self.cache: KVCache = self.runner.allocate_cache(max_num_seqs, self.max_model_len)
        self.vocab_size = cfg.vocab_size
        self.metrics = metrics or EngineMetrics()
        self.speculative = speculative
        self.proposer: NgramProposer | DraftModelProposer | None = None
        if speculative is not None and speculative.method == "draft":
            self.proposer = load_draft_model(speculative.draft_model, tokenizer, cfg, max_num_seqs, self.max_model_len,
                                             dtype, quantize)
        elif speculative is not None:
            self.proposer = NgramProposer(speculative)
        self.plain_step_s: float | None = None  # recent wall time of a one-token decode step (speed-up estimates)
        self.spec_draft_tokens = self.spec_accepted_tokens = 0

        self.eos_token_ids = self._eos_ids(generation_config or {})
        eot = {i for t in END_OF_TURN_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
        self.chat_stop_token_ids = frozenset(self.eos_token_ids | eot)
        self.chat_template = self._pick_template(self.tokenizer_config.get("chat_template"))

        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._free_slots = list(range(max_num_seqs))  # oldest-freed first: a new prompt evicts the stalest cache
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_num_seqs)]  # tokens whose K/V a slot holds
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens whose keys/values were reused
        self.prefill_tokens_computed = 0  # prompt tokens that went through the model
        self._worker: threading.Thread | None = None  # the background driver, when one runs
        self._driver: threading.Thread | None = None  # the thread running steps now (worker, caller or server)
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # work to run on the driver (embeddings)
        self._stopping = False
        self.worker_idle_s = 1.0
        self._ids = itertools.count()

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, max_num_seqs: int = 4, max_model_len: int | None = 2048,
                    dtype: str = "float32", quantize: str | None = None, device: str = "cpu",
                    max_prefill_tokens: int = 4096, max_num_batched_tokens: int | None = None,
                    enable_prefix_caching: bool = True, prefill_chunk_size: int | None = 512,
                    speculative: SpeculativeConfig | None = None) -> "Engine":
        """Load an HF-layout model folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

        ``max_model_len`` caps the context (and so the KV-cache size: slots x layers x kv-heads x len x head_dim);
        ``None`` uses the model's full ``max_position_embeddings``.  ``dtype`` ("float32", "bfloat16") is what the
        serving weights and cache use; ``quantize="int8"`` stores linear weights as int8 with a scale per 32 inputs
        (llama.cpp's q8_0), ``"int4"`` as 4-bit with a scale and minimum per 32 inputs (q4_1; int8 output head), both
        multiplied by int8-quantised activations in a C++/AVX2 kernel, or by a pure-PyTorch reference where that
        cannot be built (``lmforge.serve.kernels``; ``docs/benchmarks.md`` has their speed and perplexity).
        ``prefill_chunk_size``: prompt tokens computed per step (long prompts are prefilled in chunks).
        ``speculative``: speculative decoding (``lmforge.serve.speculative``), e.g.
        ``SpeculativeConfig("ngram", num_draft_tokens=4)`` or ``SpeculativeConfig("draft", draft_model=folder)``."""
        path = Path(path)
        model = load_model(path, dtype=torch.float32, device=device)
        tokenizer, tok_cfg = load_tokenizer(path)
        gen_path = path / "generation_config.json"
        gen_cfg = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        return cls(model, tokenizer, tok_cfg, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                   generation_config=gen_cfg, dtype=dtype, quantize=quantize, max_prefill_tokens=max_prefill_tokens,
                   max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                   prefill_chunk_size=prefill_chunk_size, speculative=speculative)

    def _eos_ids(self, generation_config: dict) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.config.eos_token_id, generation_config.get("eos_token_id")):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list):
                ids.update(int(i) for i in src)
        eos = self.tokenizer_config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for tok in (eos, "<|endoftext|>") if eos is None else (eos,):
            if tok is not None and (i := self.tokenizer.token_to_id(tok)) is not None:
                ids.add(i)
        return ids

    @staticmethod
    def _pick_template(tpl) -> str:
        if isinstance(tpl, list):  # HF allows [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        return tpl or CHAT_TEMPLATE

    # -- text <-> tokens -----------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the tokenizer's jinja chat template, as HF does."""
        return _render_chat_template(self.chat_template, messages, add_generation_prompt, self.tokenizer_config)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template already contains any special tokens it wants (HF apply_chat_template does the same)
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    # -- requests --------------------------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise ``ValueError`` / ``PromptTooLongError`` for a request that cannot run; return its max_tokens."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        room = self.max_model_len - n
        if room < 1:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt is "
                f"{n} tokens long, which leaves no room for a completion. Please reduce the length of the prompt.")
        if params.max_tokens is not None and params.max_tokens > room:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the completion). "
                f"Please reduce the length of the prompt or max_tokens.")
        return params.max_tokens if params.max_tokens is not None else room

    def add_request(self, prompt: str | list[int], params: SamplingParams | None, sink: Sink,
                    request_id: str | None = None, *, start_worker: bool = True) -> str:
        """Queue a request (thread-safe); outputs are delivered by calling ``sink`` from the driving thread.

        Stop token ids are ``params.stop_token_ids`` plus the model's eos token(s).  With no driver running, a
        background worker starts, unless ``start_worker`` is false (the caller then drives, as ``generate`` does)."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self.check_request(prompt_ids, params)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        seq = _Sequence(
            request_id=rid, prompt_ids=prompt_ids, params=params, sink=sink, max_tokens=max_tokens,
            stop_token_ids=frozenset(self.eos_token_ids | set(params.stop_token_ids)),
            sampler=SamplerState(params, prompt_ids), detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStringMatcher(params.stop), arrival=time.perf_counter())
        if self.proposer is not None:
            note = speculation_blocker(params)
            seq.spec = SpecStats(self.proposer.method, enabled=note is None, note=note,
                                 k=self.speculative.num_draft_tokens)
        with self._lock:
            if rid in self._by_id:
                raise ValueError(f"request id {rid!r} is already in use")
            self._by_id[rid] = seq
            self._waiting.append(seq)
            if start_worker:
                self._ensure_worker()
            self._lock.notify_all()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. the client went away); its slot is freed at the next step."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.aborted = True
                self._lock.notify_all()

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[GenerationOutput]:
        """Blocking, streaming: yields outputs as the engine produces them (the last has ``finished=True``).

        When no other thread drives the engine, the calling thread does, until this request has output."""
        q: queue.Queue[GenerationOutput] = queue.Queue()
        rid = self.add_request(prompt, params, q.put, start_worker=False)
        done = False
        try:
            while True:
                out = self._next_output(q)
                if out.error is not None:
                    done = True
                    raise EngineError(out.error)
                yield out
                if out.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(rid)
            with self._lock:  # other threads' requests this caller was stepping go on without it
                if self._driver is None and self._work_left():
                    self._ensure_worker()

    def generate_text(self, prompt: str | list[int], params: SamplingParams | None = None) -> GenerationResult:
        text, ids, lps, last = [], [], [], None
        for last in self.generate(prompt, params):
            text.append(last.text)
            ids.extend(last.token_ids)
            lps.extend(last.logprobs or [])
        return GenerationResult("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens,
                                lps if params is not None and params.logprobs is not None else None,
                                last.speculative)

    def generate_batch(self, prompts: list[str | list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationResult]:
        """All ``prompts`` at once (continuous batching, shared prefixes cached), driven on the calling thread until
        every one has finished; results in prompt order.  For offline callers (best-of-n sampling, RL rollouts)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        q: queue.Queue[GenerationOutput] = queue.Queue()
        first: dict[tuple, int] = {}  # one request per distinct prompt goes first; its copies join once it is cached
        for i, p in enumerate(prompts):
            first.setdefault(tuple(self.encode(p) if isinstance(p, str) else p), i)
        ids: list[str | None] = [None] * len(prompts)
        for i in first.values():
            ids[i] = self.add_request(prompts[i], plist[i], q.put, start_worker=False)
        if len(first) < len(prompts) and self.enable_prefix_caching:
            with self._lock:
                mine = self._claim()
            if mine:
                try:
                    # prefill the distinct prompts completely (a long one takes several chunks, and steps past the
                    # admission of the last one): their copies then reuse the whole cached prompt, computing only its
                    # last token, instead of each computing the part not yet cached when they join
                    while self._prefilling([ids[i] for i in first.values()]):
                        self._step_or_fail()
                finally:
                    with self._lock:
                        self._release(hand_off=False)
        for i, p in enumerate(prompts):
            if ids[i] is None:
                ids[i] = self.add_request(p, plist[i], q.put, start_worker=False)
        parts: dict[str, list[GenerationOutput]] = {rid: [] for rid in ids}
        left = len(ids)
        try:
            while left:
                out = self._next_output(q)
                parts[out.request_id].append(out)
                if out.finished:
                    left -= 1
                    if out.error is not None:
                        raise EngineError(out.error)
        finally:
            if left:
                for rid in ids:
                    self.abort(rid)
        results = []
        for rid, sp in zip(ids, plist):
            outs = parts[rid]
            results.append(GenerationResult(
                "".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1].finish_reason,
                outs[-1].prompt_tokens, outs[-1].completion_tokens,
                [lp for o in outs for lp in (o.logprobs or [])] if sp is not None and sp.logprobs is not None else None))
        return results

    def _prefilling(self, request_ids: list[str | None]) -> bool:
        """Whether any of these requests still waits or has prompt tokens left to compute (or other requests wait)."""
        with self._lock:
            return bool(self._waiting) or any(
                (s := self._by_id.get(rid)) is not None and s.num_cached < len(s.prompt_ids) for rid in request_ids)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (call it after the weights change: cached keys/values are stale) and return the
        free slots to their initial order, so the next batch runs as on a fresh engine."""
        with self._lock:
            if self._running or self._waiting:
                raise RuntimeError("reset_prefix_cache() needs an idle engine")
            self._slot_tokens = [[] for _ in range(self.max_num_seqs)]
            self._free_slots = list(range(self.max_num_seqs))

    def load_weights(self, model: Llama) -> None:
        """Copy ``model``'s weights into the serving weights in place (no reload from disk, same dtype /
        quantisation), then reset the prefix cache.  ``model`` must have this engine's architecture."""
        fresh = ModelRunner(model, self.runner.dtype, self.runner.quantize)
        with torch.no_grad():
            for dst, src in zip(self.runner.tensors(), fresh.tensors(), strict=True):
                dst.copy_(src)
        self.reset_prefix_cache()

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy some of the model's weights (``Llama`` parameter name → tensor; e.g. only those a LoRA step changed)
        into the serving weights in place, as ``load_weights`` would prepare them, and into ``model``; then reset the
        prefix cache.  Costs a copy of what changed, where ``load_weights`` prepares every weight anew."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise KeyError(f"not parameters of this engine's model: {', '.join(unknown[:5])}")
        with torch.no_grad():
            self.runner.update(weights)
            served = {t.data_ptr() for t in self.runner.tensors()}  # float32 weights the runner shares with model
            for name, w in weights.items():
                if params[name].data_ptr() not in served and params[name].data_ptr() != w.data_ptr():
                    params[name].copy_(w)
        self.reset_prefix_cache()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    @property
    def dtype(self) -> str:
        """What the forward pass computes in between the matmuls ("float32", "bfloat16", ...): ``dtype``, except that
        with int8/int4 weights a bf16 request computes in float32 on CPUs without native bf16 (``hardware.native_bf16``).
        The int8/int4 matmuls themselves quantise their float32 inputs to int8 per block of 32."""
        return str(self.runner.act_dtype).removeprefix("torch.")

    @property
    def quantize(self) -> str | None:
        return self.runner.quantize

    # -- load figures (what /metrics reports) ----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's token positions holding a running sequence's keys/values (0..1)."""
        used = sum(s.num_cached for s in list(self._running))
        return used / (self.max_num_seqs * self.max_model_len)

    # -- embeddings ------------------------------------------------------------------------------------------------------
    def embed(self, prompt: str | list[int]) -> torch.Tensor:
        """Mean-pooled final hidden states (after the last norm) of one input, float32 [hidden_size].

        Runs on the driving thread (see the module docstring) with its own small cache, so it does not take a slot from
        generation."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the input is empty")
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(f"This model's maximum context length is {self.max_model_len} tokens. "
                                     f"However, the input is {len(ids)} tokens long.")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        return self.call_on_driver(lambda: self._embed_ids(ids))

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        cache = self.runner.allocate_cache(1, len(ids))
        x = torch.tensor([ids], device=self.device)
        h = self.runner.forward(x, torch.arange(len(ids), device=self.device)[None], cache,
                                torch.zeros(1, dtype=torch.long, device=self.device), hidden=True)
        return h[0].float().mean(dim=0)

    # -- the scheduler ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> int:
        """One scheduler iteration; returns how many sequences it advanced (queued ``call_on_driver`` work runs
        first)."""
        while True:
            with self._lock:
                if not self._jobs:
                    break
                fn, fut = self._jobs.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as err:  # handed to the caller waiting on the future
                    fut.set_exception(err)
        with self._lock:
            for seq in [s for s in self._waiting if s.aborted]:
                self._waiting.remove(seq)
                self._finish(seq, "abort", "")
            for seq in [s for s in self._running if s.aborted]:
                self._finish(seq, "abort", "")
            decoding = [s for s in self._running if s.prefilled]
            budget = self.max_num_batched_tokens - len(decoding)
            chunk_left = self.prefill_chunk_size  # prompt tokens this step (one chunk, over all prompts)
            prefill_budget = self.max_prefill_tokens
            chunks: list[tuple[_Sequence, int, int, int]] = []  # (sequence, source slot, tokens reused, tokens now)
            for seq in [s for s in self._running if not s.prefilled]:  # prompts admitted in earlier steps go on
                n = min(len(seq.prompt_ids) - seq.num_cached, chunk_left)
                if n <= 0 or (n > budget and (chunks or decoding)):
                    break
                chunks.append((seq, seq.slot, seq.num_cached, n))
                budget, chunk_left, prefill_budget = budget - n, chunk_left - n, prefill_budget - n
            while self._waiting and self._free_slots and chunk_left > 0:
                seq = self._waiting[0]
                slot, src, reused = self._place(seq.prompt_ids)
                cost = len(seq.prompt_ids) - reused
                n = min(cost, chunk_left)
                if (n > budget or n > prefill_budget) and (chunks or decoding):
                    break  # waits for a later step (a lone request always runs, a chunk at a time)
                self._waiting.popleft()
                self._free_slots.remove(slot)
                seq.slot = slot
                self._slot_tokens[slot] = seq.prompt_ids[:reused]
                budget, chunk_left, prefill_budget = budget - n, chunk_left - n, prefill_budget - n
                chunks.append((seq, src, reused, n))
                self._running.append(seq)
                self.prefix_cache_queries += len(seq.prompt_ids)
                self.prefix_cache_hits += reused
                self.metrics.on_prompt(len(seq.prompt_ids))
                self.metrics.on_prefix_cache(len(seq.prompt_ids), reused)
        if decoding:
            self._decode(decoding)
        if chunks:
            self._prefill(chunks)
        return len(decoding) + len(chunks)

    def _place(self, prompt: list[int]) -> tuple[int, int, int]:
        """(free slot to use, slot to copy the cached prefix from, prefix length) for a prompt; called with the lock.

        At most ``len(prompt) - 1`` tokens are reused: the last prompt token is always computed for its logits."""
        if not self.enable_prefix_caching:
            return self._free_slots[0], self._free_slots[0], 0
        limit = len(prompt) - 1
        dst, dst_len = self._free_slots[0], -1
        for slot in self._free_slots:  # oldest first, so ties evict the stalest cache
            n = _common_prefix(self._slot_tokens[slot], prompt, limit)
            if n > dst_len:
                dst, dst_len = slot, n
        src, src_len = dst, dst_len
        for slot, tokens in enumerate(self._slot_tokens):  # running sequences and other free slots
            if slot != dst and (n := _common_prefix(tokens, prompt, limit)) > src_len:
                src, src_len = slot, n
        return dst, src, src_len

    def _prefill(self, chunks: list[tuple[_Sequence, int, int, int]]) -> None:
        """The next ``n`` uncached prompt tokens of every sequence in ``chunks`` in one forward pass, right-padded
        to the longest (chunks of very unequal lengths in a few passes: ``_prefill_groups``); a sequence whose prompt
        is then complete samples its first token.  A pad token's key lands
        at a position past its row's prompt, which no real query attends to and a later step overwrites.

        A newly admitted sequence first gets its reused prefix copied from the source slot."""
        for seq, src, reused, _ in chunks:  # in admission order: a source admitted earlier already holds its prefix
            if seq.num_cached == 0 and reused:
                if src != seq.slot:
                    for ck, cv in zip(self.cache.k, self.cache.v):
                        ck[seq.slot, :, :reused] = ck[src, :, :reused]
                        cv[seq.slot, :, :reused] = cv[src, :, :reused]
                seq.num_cached = reused
        seqs = [c[0] for c in chunks]
        starts = [s.num_cached for s in seqs]
        lens = [c[3] for c in chunks]
        groups = _prefill_groups(lens)
        if len(groups) == 1:
            logits = self._prefill_forward(seqs, starts, lens)
        else:
            got: dict[int, torch.Tensor] = {}
            for g in groups:
                out = self._prefill_forward([seqs[i] for i in g], [starts[i] for i in g], [lens[i] for i in g])
                got.update(zip(g, out))
            logits = torch.stack([got[i] for i in range(len(seqs))])
        done = []
        for i, (s, n) in enumerate(zip(seqs, lens)):
            s.num_cached += n
            self._slot_tokens[s.slot] = s.prompt_ids[:s.num_cached]
            self.prefill_tokens_computed += n
            if s.num_cached == len(s.prompt_ids):
                done.append(i)
        if not done:
            return
        results = sample(logits[done], [seqs[i].sampler for i in done], [seqs[i].output_ids for i in done])
        for i, res in zip(done, results):
            self._append(seqs[i], res)

    def _prefill_forward(self, seqs: list[_Sequence], starts: list[int], lens: list[int]) -> torch.Tensor:
        """Logits at the last token of each sequence's next ``lens`` prompt tokens from ``starts``, one padded pass."""
        T = max(lens)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :lens[i]] = torch.tensor(s.prompt_ids[starts[i]:starts[i] + lens[i]])
        positions = (torch.tensor(starts)[:, None] + torch.arange(T)).clamp_(max=self.max_model_len - 1)
        rows = torch.tensor([s.slot for s in seqs])
        last = torch.tensor([n - 1 for n in lens])
        return self.runner.forward(ids.to(self.device), positions.to(self.device), self.cache, rows.to(self.device),
                                   last.to(self.device))

    def _decode(self, seqs: list[_Sequence]) -> None:
        t0 = time.perf_counter()
        drafts, qs = self._propose(seqs)
        if not any(drafts):
            ids = torch.tensor([[s.output_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
            positions = torch.tensor([[s.num_cached] for s in seqs], device=self.device)
            rows = torch.tensor([s.slot for s in seqs], device=self.device)
            logits = self.runner.forward(ids, positions, self.cache, rows)
            for s in seqs:
                s.num_cached += 1
            results = sample(logits, [s.sampler for s in seqs], [s.output_ids for s in seqs])
            self._account(seqs, time.perf_counter() - t0, plain=True)
            for s, res in zip(seqs, results):
                self._append(s, res)
            return
        # one forward over each row's last token and its drafts (rows without drafts are padded)
        T = 1 + max(len(d) for d in drafts)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            ids[i, :1 + len(d)] = torch.tensor([s.output_ids[-1], *d])
        starts = torch.tensor([s.num_cached for s in seqs])
        positions = (starts[:, None] + torch.arange(T)).clamp_(max=self.max_model_len - 1)
        rows = torch.tensor([s.slot for s in seqs])
        logits = self._all_logits(ids, positions, rows)  # [B, T, vocab]
        outs: list[list[Sampled]] = [[] for _ in seqs]
        plain = [i for i, d in enumerate(drafts) if not d]  # the plain sampler, as in a step without drafts
        if plain:
            for i, res in zip(plain, sample(logits[plain, 0], [seqs[i].sampler for i in plain],
                                            [seqs[i].output_ids for i in plain])):
                outs[i] = [res]
                seqs[i].num_cached += 1
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            if not d:
                continue
            outs[i], accepted = verify(logits[i, :1 + len(d)], d, qs[i], s.sampler, s.output_ids)
            self.proposer.rollback(s.spec, len(s.prompt_ids) + len(s.output_ids), len(d), accepted)
            s.num_cached += 1 + accepted  # the last token and the accepted drafts; the rest is overwritten later
            s.spec.draft_tokens += len(d)
            s.spec.accepted_tokens += accepted
            s.spec.adapt(len(d), accepted, self.speculative.num_draft_tokens)
            self.spec_draft_tokens += len(d)
            self.spec_accepted_tokens += accepted
            self.metrics.on_speculation(len(d), accepted, len(outs[i]))
        self._account(seqs, time.perf_counter() - t0, plain=False)
        for s, out in zip(seqs, outs):
            for res in out:
                self._append(s, res)
                if s.finished:  # a stop token, stop string or max_tokens among the accepted drafts
                    break

    def _propose(self, seqs: list[_Sequence]) -> tuple[list[list[int]], list]:
        """Draft tokens for each sequence ([] where it does not speculate)."""
        none: tuple[list[list[int]], list] = [[] for _ in seqs], [None] * len(seqs)
        if self.proposer is None:
            return none
        pick = [i for i, s in enumerate(seqs) if s.spec is not None and s.spec.enabled
                and s.max_tokens - len(s.output_ids) > 1]
        if not pick:
            return none
        # at most the tokens the request may still produce, less the one the target adds
        ks = [min(seqs[i].spec.k, seqs[i].max_tokens - len(seqs[i].output_ids) - 1) for i in pick]
        got, qs = self.proposer.propose([seqs[i].prompt_ids + seqs[i].output_ids for i in pick], ks,
                                        [seqs[i].sampler for i in pick], [seqs[i].spec for i in pick],
                                        [seqs[i].slot for i in pick])
        drafts, q_out = none
        for i, d, q in zip(pick, got, qs):
            drafts[i], q_out[i] = d, q
        return drafts, q_out

    def _all_logits(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) at every position [B, T, vocab] (the runner's final hidden states through its head;
        one stream: its single-stream verify pass)."""
        if ids.shape[0] == 1:
            return self.runner.verify_logits(ids.to(self.device), int(positions[0, 0]), self.cache,
                                             int(rows[0]))[None].cpu()
        h = self.runner.forward(ids.to(self.device), positions.to(self.device), self.cache, rows.to(self.device),
                                hidden=True)
        logits = self.runner.lm_head(h).float()
        cap = self.model.config.final_logit_softcapping
        return (torch.tanh(logits / cap) * cap if cap else logits).cpu()

    def _account(self, seqs: list[_Sequence], seconds: float, plain: bool) -> None:
        """Per-request speculation figures, and the recent plain step time they are compared with."""
        if self.proposer is None:
            return
        if plain:
            self.plain_step_s = seconds if self.plain_step_s is None else 0.9 * self.plain_step_s + 0.1 * seconds
        for s in seqs:
            if s.spec is not None and s.spec.enabled:
                s.spec.decode_steps += 1
                s.spec.decode_seconds += seconds

    def _append(self, seq: _Sequence, res: Sampled) -> None:
        """Take one sampled token: detokenize, check stop conditions, emit."""
        token = res.token
        now = time.perf_counter()
        if seq.spec is not None and seq.output_ids:
            seq.spec.decode_tokens += 1
        if not seq.output_ids:
            self.metrics.on_first_token(now - seq.arrival)
        else:
            self.metrics.on_output_token(now - seq.last_token_time)
        seq.last_token_time = now
        seq.output_ids.append(token)
        seq.unsent_ids.append(token)
        if seq.params.logprobs is not None:
            seq.unsent_logprobs.append(res)
        if token in seq.stop_token_ids:  # the stop token itself is not part of the text
            text, hit = seq.stops.feed(seq.detok.flush())
            self._finish(seq, "stop", text + ("" if hit else seq.stops.flush()))
            return
        text, hit = seq.stops.feed(seq.detok.push(token))
        if hit:
            self._finish(seq, "stop", text)
        elif len(seq.output_ids) >= seq.max_tokens:
            more, hit = seq.stops.feed(seq.detok.flush())
            text += more if hit else more + seq.stops.flush()
            self._finish(seq, "stop" if hit else "length", text)
        elif text:
            ids, seq.unsent_ids = seq.unsent_ids, []
            lps, seq.unsent_logprobs = seq.unsent_logprobs, []
            self._emit(seq, GenerationOutput(seq.request_id, text, ids, prompt_tokens=len(seq.prompt_ids),
                                             completion_tokens=len(seq.output_ids),
                                             logprobs=lps if seq.params.logprobs is not None else None))

    def _finish(self, seq: _Sequence, reason: str, text: str, error: str | None = None) -> None:
        with self._lock:
            if seq.finished:
                return
            seq.finished = True
            if seq in self._running:
                self._running.remove(seq)
            if seq.slot is not None:
                self._slot_tokens[seq.slot] = (seq.prompt_ids + seq.output_ids)[:seq.num_cached]
                self._free_slots.append(seq.slot)
                seq.slot = None
            self._by_id.pop(seq.request_id, None)
            ids, seq.unsent_ids = seq.unsent_ids, []
            lps, seq.unsent_logprobs = seq.unsent_logprobs, []
        spec = None if seq.spec is None else seq.spec.as_dict(self.plain_step_s)
        try:
            self.metrics.on_finish(len(seq.prompt_ids), len(seq.output_ids), reason,
                                   time.perf_counter() - seq.arrival)
            if spec is not None and seq.spec.enabled and seq.spec.decode_steps:
                self.metrics.on_speculative_request(spec)
        except Exception:
            log.debug("metrics hook failed", exc_info=True)
        self._emit(seq, GenerationOutput(seq.request_id, text, ids, True, reason, len(seq.prompt_ids),
                                         len(seq.output_ids), error,
                                         lps if seq.params.logprobs is not None else None, spec))

    @staticmethod
    def _emit(seq: _Sequence, out: GenerationOutput) -> None:
        try:
            seq.sink(out)
        except Exception:  # a sink whose consumer is gone must not take the engine down
            log.debug("sink of %s failed", seq.request_id, exc_info=True)
            seq.aborted = True

    # -- who runs the steps (see the module docstring) -----------------------------------------------------------------
    def _claim(self) -> bool:  # called with the lock held
        if self._driver is None:
            self._driver = threading.current_thread()
            return True
        return self._driver is threading.current_thread()

    def _release(self, hand_off: bool = True) -> None:  # called with the lock held
        self._driver = None
        if hand_off and self._work_left():
            self._ensure_worker()  # leftover work (other threads' requests) goes on without this thread
        self._lock.notify_all()

    def _work_left(self) -> bool:  # called with the lock held
        return bool(self._waiting or self._running or self._jobs)

    def _step_or_fail(self) -> None:
        try:
            self.step()
        except Exception as err:  # fail every in-flight request instead of hanging its client
            log.exception("engine step failed")
            with self._lock:
                victims = list(self._running) + list(self._waiting)
                self._waiting.clear()
            for seq in victims:
                self._finish(seq, "error", "", error=f"{type(err).__name__}: {err}")

    def _next_output(self, q: "queue.Queue[GenerationOutput]") -> GenerationOutput:
        """The next output for a ``generate`` caller: step the engine on this thread while no one else drives it."""
        while True:
            try:
                return q.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                mine = self._claim()
            if not mine:
                return q.get()  # the driver delivers it; when that driver stops, it hands leftover work on
            try:
                while q.empty():
                    with self._lock:
                        if not self._work_left() or self._stopping:
                            break
                    self._step_or_fail()
            finally:
                with self._lock:  # no hand-off: this caller comes back for its next output (generate hands off)
                    self._release(hand_off=False)
                    stopping = self._stopping
            if stopping:
                return q.get()  # shutdown() delivers the abort

    def call_on_driver(self, fn: Callable[[], object]) -> object:
        """Run ``fn()`` on the thread that drives the engine (on this one when none does) and return its result."""
        with self._lock:
            mine = self._claim()
            if not mine:
                fut: Future = Future()
                self._jobs.append((fn, fut))
                self._lock.notify_all()
        if not mine:
            return fut.result()
        try:
            return fn()
        finally:
            with self._lock:
                self._release()

    def _ensure_worker(self) -> None:  # called with the lock held
        if self._driver is None and not self._stopping:
            self._worker = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._driver = self._worker
            self._worker.start()

    def _loop(self, forever: bool = False, stop: Callable[[], bool] | None = None) -> None:
        """Drive the engine until stopped; a background worker (``forever=False``) gives up after ``worker_idle_s``
        without work."""
        try:
            while True:
                with self._lock:
                    idle_since = time.monotonic()
                    while not (self._work_left() or self._stopping):
                        if stop is not None and stop():
                            return
                        self._lock.wait(timeout=0.25 if forever else self.worker_idle_s)
                        if not forever and not self._work_left() and \
                                time.monotonic() - idle_since >= self.worker_idle_s:
                            return
                    if self._stopping:
                        return
                self._step_or_fail()
        finally:
            with self._lock:
                if self._driver is threading.current_thread():
                    self._driver = None
                if self._worker is threading.current_thread():
                    self._worker = None
                if not self._stopping and self._work_left():
                    self._ensure_worker()
                self._lock.notify_all()

    def run_forever(self, stop: Callable[[], bool] | None = None) -> None:
        """Drive the engine on the calling thread until ``shutdown()`` (or until ``stop()`` returns true, checked
        while idle).  ``lmforge serve`` calls it on the main thread, which loaded the model, while uvicorn runs on
        another: decode steps then run at full speed (see the module docstring)."""
        with self._lock:
            while not self._claim():  # wait for a caller or worker that is driving now to hand the role back
                self._lock.wait(timeout=0.1)
        self._loop(forever=True, stop=stop)

    def request_stop(self) -> None:
        """Ask the driver to stop after its current step (safe from a signal handler: no lock); ``run_forever``
        returns, and ``shutdown()`` then aborts what is still in flight."""
        self._stopping = True

    def shutdown(self) -> None:
        """Stop driving (in-flight requests are aborted: they finish with ``finish_reason="abort"``)."""
        with self._lock:
            self._stopping = True
            for seq in list(self._running) + list(self._waiting):
                seq.aborted = True
            self._lock.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=10)
        with self._lock:
            deadline = time.monotonic() + 10
            while self._driver not in (None, threading.current_thread()) and time.monotonic() < deadline:
                self._lock.wait(timeout=0.1)  # a caller or run_forever() finishing its step
            victims = list(self._running) + list(self._waiting)
            self._waiting.clear()
            jobs, self._jobs = list(self._jobs), deque()
        for seq in victims:
            self._finish(seq, "abort", "")
        for _, fut in jobs:
            fut.cancel()
        with self._lock:
            self._worker = None
            self._stopping = False  # the engine takes new requests again


def _prefill_groups(lens: list[int]) -> list[list[int]]:
    """Which prefill chunks (of these token counts) share one padded forward pass.  Padded to the longest, chunks of
    unequal lengths compute padding: longest first, a chunk joins the current group while padding stays within a
    quarter of the group's rows, else it starts the next (a 344-token prompt next to 168 tokens of another: 688 rows
    for 512 in one pass; a 182-token chunk next to fourteen 1-token ones: 2,730 for 196)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        g = groups[-1] if groups else None
        if g is not None and 4 * (sum(lens[j] for j in g) + lens[i]) >= 3 * (len(g) + 1) * lens[g[0]]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit`` (compares 64-token chunks at C speed)."""
    n = min(len(a), len(b), limit)
    i = 0
    while i + 64 <= n and a[i:i + 64] == b[i:i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                          tokenizer_config: dict) -> str:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ChatTemplateError(message)

    env = _TEMPLATE_ENVS.get(template)
    if env is None:
        jenv = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        jenv.globals["raise_exception"] = raise_exception
        jenv.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env = _TEMPLATE_ENVS[template] = jenv.from_string(template)
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        val = tokenizer_config.get(key)
        special[key] = val.get("content") if isinstance(val, dict) else val
    try:
        return env.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the chat template failed: {err}") from None


_TEMPLATE_ENVS: dict[str, object] = {}
