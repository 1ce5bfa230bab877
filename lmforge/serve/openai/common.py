"""What every endpoint shares: OpenAI's error envelope, the server context, the concurrency limiter, the fan-out of
one HTTP request into engine requests, server-sent events and logprob formatting."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.serve.engine import Engine, GenerationOutput, PromptTooLongError
from lmforge.serve.protocol import (
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    ErrorInfo,
    ErrorResponse,
    TopLogprob,
)
from lmforge.serve.sampling import LogitsProcessor, Sampled, SamplingParams

MAX_CHOICES = 64  # prompts x n in one request


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | int | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    errors = err.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    parts, param = [], None
    if len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",) and errors[0].get("type") == "missing":
        return "A JSON request body is required", None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        param = param or where or None
        msg = e.get("msg", "invalid value")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "Invalid request body", param


class Limiter:
    """Counts HTTP requests that hold engine work; refuses one over the limit with a 429."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise APIError(429, f"The server is busy: {self.active} requests are in flight (limit {self.limit}). "
                                "Retry later.", type="rate_limit_exceeded", code="too_many_requests")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class Guard:
    """Pure ASGI middleware (so disconnect detection keeps working): API key on ``/v1/*``, body size limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            error = None
            if self.api_key is not None and scope["path"].startswith("/v1/") \
                    and headers.get("authorization", "") != f"Bearer {self.api_key}":
                error = error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                                       code="invalid_api_key")
            length = headers.get("content-length", "")
            if error is None and length.isdigit() and int(length) > self.max_body_bytes:
                error = error_response(413, f"The request body is {length} bytes; the limit is {self.max_body_bytes}.",
                                       code="request_too_large")
            if error is not None:
                await error(scope, receive, send)
                return
        await self.app(scope, receive, send)


# a chat hook sees every chat request first (after the model check) and may answer it: RAG, personas, agents
ChatHook = Callable[[object, Request], Awaitable[Response | dict | None]]


@dataclass
class ServerContext:
    """One served model: the engine, its name, limits and the hooks other packages register."""

    engine: Engine
    model_name: str
    limiter: Limiter
    max_tokens_limit: int | None = None
    chat_hooks: list[ChatHook] = field(default_factory=list)
    recorder: object = None  # a ``lmforge.feedback.store.Recorder`` when serving with --record
    extra_models: list[str] = field(default_factory=list)  # other names a chat hook answers (persona:<name>)
    _structured: object = None

    async def record(self, response_id: str, endpoint: str, request, req, choices: list[dict], prompt_tokens: int,
                     completion_tokens: int, started: float) -> None:
        """Store one answer (``--record``), off the event loop; ``req``'s sampling fields are its parameters."""
        if self.recorder is None:
            return
        params = req.model_dump(exclude_none=True, exclude={"messages", "prompt", "tools", "stream_options"})
        params["model"] = self.model_name
        try:
            await asyncio.to_thread(self.recorder.record, response_id, endpoint, request, params, choices,
                                    prompt_tokens, completion_tokens, round(time.monotonic() - started, 4))
        except sqlite3.Error:  # the client still gets its answer; the log says which one was not recorded
            logging.getLogger("lmforge.serve").exception("could not record response %s", response_id)

    @property
    def structured(self):
        """Grammar compilation for this engine's tokenizer (``lmforge.serve.structured``), made on first use."""
        if self._structured is None:
            from lmforge.serve.structured import StructuredOutputs

            try:
                self._structured = StructuredOutputs.for_engine(self.engine)
            except ImportError as err:
                raise APIError(501, f"structured output and tools need the grammar backends: pip install "
                                    f"'lmforge[structured]' ({err})", type="server_error",
                               code="not_implemented") from None
        return self._structured

    async def processor_factory(self, spec, field: str | None) -> Callable[[], list[LogitsProcessor]] | None:
        """For a request's output constraint (``None``: none), a function giving each choice its own grammar
        processor; the grammar is compiled on the pool (cached), never on the event loop or the engine's thread.
        A bad spec is a 400 naming ``field``."""
        if spec is None:
            return None
        from lmforge.serve.structured import StructuredOutputError

        try:
            compiled = await asyncio.wrap_future(self.structured.compile(spec))
        except StructuredOutputError as err:
            raise APIError(400, f"{field}: {err}", param=field) from None
        return lambda: [self.structured.make_processor(compiled)]

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.extra_models:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def token_text(self, tok: int) -> str:
        return self.engine.tokenizer.decode([tok], skip_special_tokens=False)

    def sampling_params(self, req, max_tokens: int | None, stop_token_ids, i: int,
                        processors: list[LogitsProcessor] | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logprobs=req.num_logprobs,
            max_tokens=max_tokens,
            stop=req.stop_list,
            stop_token_ids=sorted(stop_token_ids),
            seed=None if req.seed is None else req.seed + i,  # n choices with one seed differ, reproducibly
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            logits_processors=list(processors or []),
        )

    def submit(self, req, prompts: list[list[int]], max_tokens: int | None, stop_token_ids, prompt_param: str,
               make_processors: Callable[[], list[LogitsProcessor]] | None = None) -> "Fanout":
        """Check and queue every choice of a request (prompts x n); ``make_processors`` gives each its own."""
        limit = self.max_tokens_limit
        if limit is not None and max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens")
        if limit is not None and max_tokens is None:
            max_tokens = limit
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts x n), got {len(prompts) * req.n}",
                           param="n")
        params = [[self.sampling_params(req, max_tokens, stop_token_ids, j, make_processors() if make_processors
                                        else None) for j in range(req.n)] for _ in prompts]
        try:
            for p, ids in enumerate(prompts):  # check everything before queueing anything
                self.engine.check_request(ids, params[p][0])
        except PromptTooLongError as err:
            raise APIError(400, str(err), param=prompt_param, code="context_length_exceeded") from None
        except ValueError as err:
            raise APIError(400, str(err), param=prompt_param) from None
        fan = Fanout(self.engine, self.limiter)
        try:
            for p, ids in enumerate(prompts):
                for j in range(req.n):
                    fan.add(p * req.n + j, ids, params[p][j])
        except Exception:
            fan.abort()
            raise
        return fan

    def chat_logprobs(self, items: list[Sampled] | None) -> ChoiceLogprobs | None:
        if items is None:
            return None
        content = []
        for it in items:
            t = self.token_text(it.token)
            top = [TopLogprob(token=(a := self.token_text(i)), logprob=lp, bytes=list(a.encode()))
                   for i, lp in it.top or []]
            content.append(ChatTokenLogprob(token=t, logprob=it.logprob, bytes=list(t.encode()), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def completion_logprobs(self, items: list[Sampled] | None, offset: int = 0) -> CompletionLogprobs | None:
        if items is None:
            return None
        out = CompletionLogprobs()
        for it in items:
            t = self.token_text(it.token)
            out.tokens.append(t)
            out.token_logprobs.append(it.logprob)
            out.top_logprobs.append({self.token_text(i): lp for i, lp in it.top or []})
            out.text_offset.append(offset)
            offset += len(t)
        return out


class Fanout:
    """Engine requests of one HTTP request; their outputs arrive on an asyncio queue as ``(choice_index, output)``."""

    def __init__(self, engine: Engine, limiter: Limiter) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, GenerationOutput]] = asyncio.Queue()
        self.live: dict[str, int] = {}
        self.speculative: list[dict] = []  # the finished choices' speculation figures
        limiter.acquire()
        self._limiter: Limiter | None = limiter

    def add(self, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        def sink(out: GenerationOutput) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        rid = self.engine.add_request(prompt_ids, params, sink)
        self.live[rid] = index

    async def outputs(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        while self.live:
            index, out = await self.queue.get()
            if out.finished:
                self.live.pop(out.request_id, None)
                if out.speculative is not None:
                    self.speculative.append(out.speculative)
            if out.error is not None:
                self.abort()
                raise APIError(500, f"generation failed: {out.error}", type="server_error")
            yield index, out

    def speculative_usage(self) -> dict | None:
        """The usage extras ``speculative`` object: one choice's figures, or for several their sums (and the rates
        of the sums); None without speculation."""
        return merge_speculative(self.speculative)

    def abort(self) -> None:
        """Abort what is still running and give the request's concurrency slot back (idempotent)."""
        for rid in list(self.live):
            self.engine.abort(rid)
        self.live.clear()
        if self._limiter is not None:
            self._limiter.release()
            self._limiter = None


def merge_speculative(items: list[dict]) -> dict | None:
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    on = [s for s in items if s.get("enabled")]
    out = {"method": items[0].get("method"), "enabled": bool(on)}
    notes = sorted({s["note"] for s in items if s.get("note")})
    if notes:
        out["note"] = "; ".join(notes)
    if on:
        drafted, accepted = sum(s["draft_tokens"] for s in on), sum(s["accepted_tokens"] for s in on)
        steps = sum(s["decode_steps"] for s in on)
        tokens = sum(s["decode_steps"] * (s["tokens_per_step"] or 0) for s in on)
        speedups = [s["speedup"] for s in on if s.get("speedup") is not None]
        out.update(draft_tokens=drafted, accepted_tokens=accepted,
                   acceptance_rate=round(accepted / drafted, 4) if drafted else None, decode_steps=steps,
                   tokens_per_step=round(tokens / steps, 4) if steps else None,
                   speedup=round(sum(speedups) / len(speedups), 3) if speedups else None)
    return out


def finish_reason(out: GenerationOutput) -> str | None:
    """OpenAI's "stop" / "length", or "abort" (vLLM's name) for a completion the server cut short (shutdown)."""
    return out.finish_reason if out.finish_reason in ("stop", "length", "abort") else None


def sse(obj) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json(exclude_unset=False)
    return f"data: {data}\n\n"


def streaming(events: AsyncIterator[str], fan: Fanout) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield sse(json.dumps(ErrorResponse(error=ErrorInfo(message=err.message, type=err.type)).model_dump()))
        finally:
            fan.abort()  # client went away or we are done: free the cache slots
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _watch_disconnect(request: Request, fan: Fanout) -> None:
    """Abort ``fan`` when the client of a non-streaming request goes away (streams notice on their own)."""
    while fan.live:
        if await request.is_disconnected():
            fan.abort()
            return
        await asyncio.sleep(0.1)


async def collect(request: Request, fan: Fanout, count: int
                  ) -> tuple[list[str], list[str | None], int, list[list[Sampled]]]:
    """Every choice's whole text, finish reason and logprobs, and the completion tokens of all."""
    watcher = asyncio.create_task(_watch_disconnect(request, fan))
    texts: list[list[str]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    logprobs: list[list[Sampled]] = [[] for _ in range(count)]
    completion = 0
    try:
        async for i, out in fan.outputs():
            texts[i].append(out.text)
            logprobs[i].extend(out.logprobs or [])
            if out.finished:
                reasons[i] = finish_reason(out)
                completion += out.completion_tokens
    finally:
        watcher.cancel()
        fan.abort()  # no-op when all finished; frees slots if the client disconnected mid-request
    return ["".join(t) for t in texts], reasons, completion, logprobs
