"""OpenAI-compatible HTTP API over an ``Engine``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/embeddings`` (mean-pooled hidden states), ``/health``, and Prometheus ``/metrics`` under vLLM's metric names.

Each choice of a request (``n`` choices x prompts) becomes one engine request; their outputs are handed from the engine
thread to the event loop and either collected (JSON) or streamed as server-sent events ending in ``data: [DONE]``.
Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for a bad request:
validation errors and malformed JSON are 400 (not FastAPI's 422), an unknown model 404, a too-long prompt 400,
a missing / wrong API key 401 (with ``api_key`` set), a body over ``max_body_bytes`` 413, and more than
``max_concurrent_requests`` requests in flight 429.  A client that disconnects (streaming or not) has its requests
aborted, which frees their cache slots.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.engine import ChatTemplateError, Engine, GenerationOutput, PromptTooLongError
from lmforge.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
)
from lmforge.serve.sampling import Sampled, SamplingParams

log = logging.getLogger("lmforge.serve")

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


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
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


class _Limiter:
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


class _Guard:
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


class _Fanout:
    """Engine requests of one HTTP request; their outputs arrive on an asyncio queue as ``(choice_index, output)``."""

    def __init__(self, engine: Engine, limiter: _Limiter) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, GenerationOutput]] = asyncio.Queue()
        self.live: dict[str, int] = {}
        limiter.acquire()
        self._limiter: _Limiter | None = limiter

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
            if out.error is not None:
                self.abort()
                raise APIError(500, f"generation failed: {out.error}", type="server_error")
            yield index, out

    def abort(self) -> None:
        """Abort what is still running and give the request's concurrency slot back (idempotent)."""
        for rid in list(self.live):
            self.engine.abort(rid)
        self.live.clear()
        if self._limiter is not None:
            self._limiter.release()
            self._limiter = None


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_tokens_limit: int | None = None,
               max_concurrent_requests: int = 256, max_body_bytes: int = 1 << 20) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``engine`` as model ``model_name``.

    ``api_key``: require ``Authorization: Bearer <api_key>`` on ``/v1/*``.  ``max_tokens_limit``: reject requests
    asking for more completion tokens (400).  ``max_concurrent_requests``: HTTP requests generating at once before
    a 429.  ``max_body_bytes``: larger request bodies get a 413."""
    from lmforge.serve.metrics import CONTENT_TYPE_LATEST, PrometheusMetrics

    app = FastAPI(title="lmforge", description="OpenAI-compatible API served by lmforge")
    app.state.engine = engine
    app.state.model_name = model_name
    metrics = PrometheusMetrics(engine, model_name)
    engine.metrics = metrics
    limiter = _Limiter(max_concurrent_requests)

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    # -- errors in OpenAI's envelope ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException):
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        return error_response(err.status_code, str(err.detail), type_, code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")

    # -- helpers --------------------------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{model_name}`.",
                           param="model", code="model_not_found")

    def sampling_params(req, max_tokens: int | None, stop_token_ids, i: int) -> SamplingParams:
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
        )

    def submit(req, prompts: list[list[int]], max_tokens: int | None, stop_token_ids, prompt_param: str) -> _Fanout:
        if max_tokens_limit is not None and max_tokens is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {max_tokens_limit}",
                           param="max_tokens")
        if max_tokens_limit is not None and max_tokens is None:
            max_tokens = max_tokens_limit
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts x n), got {len(prompts) * req.n}",
                           param="n")
        params = [[sampling_params(req, max_tokens, stop_token_ids, j) for j in range(req.n)] for _ in prompts]
        try:
            for p, ids in enumerate(prompts):  # check everything before queueing anything
                engine.check_request(ids, params[p][0])
        except PromptTooLongError as err:
            raise APIError(400, str(err), param=prompt_param, code="context_length_exceeded") from None
        except ValueError as err:
            raise APIError(400, str(err), param=prompt_param) from None
        fan = _Fanout(engine, limiter)
        try:
            for p, ids in enumerate(prompts):
                for j in range(req.n):
                    fan.add(p * req.n + j, ids, params[p][j])
        except Exception:
            fan.abort()
            raise
        return fan

    def sse(obj) -> str:
        data = obj if isinstance(obj, str) else obj.model_dump_json()
        return f"data: {data}\n\n"

    def streaming(events: AsyncIterator[str], fan: _Fanout) -> StreamingResponse:
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

    # -- routes ---------------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def token_text(tok: int) -> str:
        return engine.tokenizer.decode([tok], skip_special_tokens=False)

    def chat_logprobs(items: list[Sampled] | None) -> ChoiceLogprobs | None:
        if items is None:
            return None
        content = []
        for it in items:
            t = token_text(it.token)
            top = [TopLogprob(token=(a := token_text(i)), logprob=lp, bytes=list(a.encode())) for i, lp in it.top or []]
            content.append(ChatTokenLogprob(token=t, logprob=it.logprob, bytes=list(t.encode()), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def completion_logprobs(items: list[Sampled] | None, offset: int = 0) -> CompletionLogprobs | None:
        if items is None:
            return None
        out = CompletionLogprobs()
        for it in items:
            t = token_text(it.token)
            out.tokens.append(t)
            out.token_logprobs.append(it.logprob)
            out.top_logprobs.append({token_text(i): lp for i, lp in it.top or []})
            out.text_offset.append(offset)
            offset += len(t)
        return out

    async def watch_disconnect(request: Request, fan: _Fanout) -> None:
        """Abort ``fan`` when the client of a non-streaming request goes away (streams notice on their own)."""
        while fan.live:
            if await request.is_disconnected():
                fan.abort()
                return
            await asyncio.sleep(0.1)

    async def collect(request: Request, fan: _Fanout, count: int):
        watcher = asyncio.create_task(watch_disconnect(request, fan))
        try:
            return await _collect(fan, count)
        finally:
            watcher.cancel()

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        check_model(req.model)
        if req.dimensions is not None and req.dimensions != engine.model.config.hidden_size:
            raise APIError(400, f"dimensions must be {engine.model.config.hidden_size} for this model", param="dimensions")
        inputs = [engine.encode(x, add_special_tokens=False) if isinstance(x, str) else list(x) for x in req.inputs()]
        if len(inputs) > MAX_CHOICES * 4:
            raise APIError(400, f"at most {MAX_CHOICES * 4} inputs per request, got {len(inputs)}", param="input")
        limiter.acquire()
        try:
            vectors = []
            for ids in inputs:
                try:
                    vectors.append(await asyncio.to_thread(engine.embed, ids))
                except PromptTooLongError as err:
                    raise APIError(400, str(err), param="input", code="context_length_exceeded") from None
                except ValueError as err:
                    raise APIError(400, str(err), param="input") from None
        finally:
            limiter.release()
        data = []
        for i, v in enumerate(vectors):
            emb = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                   else v.tolist())
            data.append(EmbeddingData(index=i, embedding=emb))
        n = sum(len(x) for x in inputs)
        return EmbeddingResponse(data=data, model=model_name, usage=UsageInfo(prompt_tokens=n, total_tokens=n))

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len, dtype=engine.dtype,
                                         quantize=engine.quantize)])

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if (bad := req.unsupported()) is not None:
            raise APIError(400, bad[1], param=bad[0])
        try:
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
            prompt_ids = engine.encode_chat(messages)
        except (ChatTemplateError, ValueError) as err:
            raise APIError(400, str(err), param="messages") from None
        fan = submit(req, [prompt_ids], req.effective_max_tokens, engine.chat_stop_token_ids, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = len(prompt_ids)

        if req.stream:
            async def events():
                completion = 0

                def chunk(choices, usage=None):
                    return sse(ChatCompletionStreamResponse(id=rid, created=created, model=model_name,
                                                            choices=choices, usage=usage))

                for i in range(req.n):
                    yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                async for i, out in fan.outputs():
                    if out.finished:
                        completion += out.completion_tokens
                    if out.text or out.finished or out.logprobs:
                        delta = DeltaMessage(content=out.text or None)
                        yield chunk([ChatCompletionStreamChoice(index=i, delta=delta, finish_reason=_reason(out),
                                                                logprobs=chat_logprobs(out.logprobs))])
                if req.include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion,
                                              total_tokens=n_prompt + completion))

            return streaming(events(), fan)

        texts, reasons, completion, lps = await collect(request, fan, req.n)
        choices = [ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=texts[i]),
                                        finish_reason=reasons[i],
                                        logprobs=chat_logprobs(lps[i] if req.logprobs else None))
                   for i in range(req.n)]
        usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion)
        return ChatCompletionResponse(id=rid, created=created, model=model_name, choices=choices, usage=usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if (bad := req.unsupported()) is not None:
            raise APIError(400, bad[1], param=bad[0])
        prompts = req.prompts()
        prompt_ids = [engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        prompt_texts = [p if isinstance(p, str) else engine.decode(p) for p in prompts]
        fan = submit(req, prompt_ids, req.max_tokens, engine.eos_token_ids, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = sum(len(p) for p in prompt_ids)
        total = len(prompts) * req.n

        if req.stream:
            async def events():
                completion = 0

                def chunk(choices, usage=None):
                    return sse(CompletionStreamResponse(id=rid, created=created, model=model_name, choices=choices,
                                                        usage=usage))

                if req.echo:
                    for i in range(total):
                        yield chunk([CompletionChoice(index=i, text=prompt_texts[i // req.n])])
                offsets = [0] * total
                async for i, out in fan.outputs():
                    if out.finished:
                        completion += out.completion_tokens
                    if out.text or out.finished or out.logprobs:
                        lp = completion_logprobs(out.logprobs, offsets[i])
                        if lp is not None and lp.tokens:
                            offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                        yield chunk([CompletionChoice(index=i, text=out.text, finish_reason=_reason(out),
                                                      logprobs=lp)])
                if req.include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion,
                                              total_tokens=n_prompt + completion))

            return streaming(events(), fan)

        texts, reasons, completion, lps = await collect(request, fan, total)
        choices = [CompletionChoice(index=i, text=(prompt_texts[i // req.n] if req.echo else "") + texts[i],
                                    finish_reason=reasons[i],
                                    logprobs=completion_logprobs(
                                        lps[i] if req.logprobs is not None else None,
                                        len(prompt_texts[i // req.n]) if req.echo else 0))
                   for i in range(total)]
        usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion)
        return CompletionResponse(id=rid, created=created, model=model_name, choices=choices, usage=usage)

    return app


def _reason(out: GenerationOutput) -> str | None:
    """OpenAI's "stop" / "length", or "abort" (vLLM's name) for a completion the server cut short (shutdown)."""
    return out.finish_reason if out.finish_reason in ("stop", "length", "abort") else None


async def _collect(fan: _Fanout, count: int) -> tuple[list[str], list[str | None], int, list[list[Sampled]]]:
    texts: list[list[str]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    logprobs: list[list[Sampled]] = [[] for _ in range(count)]
    completion = 0
    try:
        async for i, out in fan.outputs():
            texts[i].append(out.text)
            logprobs[i].extend(out.logprobs or [])
            if out.finished:
                reasons[i] = _reason(out)
                completion += out.completion_tokens
    finally:
        fan.abort()  # no-op when all finished; frees slots if the client disconnected mid-request
    return ["".join(t) for t in texts], reasons, completion, logprobs


class ServeStartError(RuntimeError):
    """The server could not start (address in use or unknown, model folder missing or unreadable): one clear line."""


def _listen(host: str, port: int):
    """Bind and listen on ``host:port`` now, before the model loads, so a taken port or a bad host fails at once."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        try:
            sock.bind(addr)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        reason = err.strerror or str(err)
        raise ServeStartError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def load_engine(model_dir: str | os.PathLike, **options) -> Engine:
    """``Engine.from_folder``, with a missing, incomplete or corrupt folder reported as one ``ServeStartError``."""
    from lmforge.serve.runner import DTYPES

    if options.get("dtype", "float32") not in DTYPES:  # a bad flag is not a bad model folder
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {options['dtype']!r}")
    if options.get("quantize") not in (None, "int8", "int4"):
        raise ValueError(f"quantize must be int8 or int4, got {options['quantize']!r}")
    path = Path(model_dir)
    if not path.is_dir():
        raise ServeStartError(f"model folder {path} does not exist" if not path.exists()
                              else f"{path} is not a model folder")
    try:
        return Engine.from_folder(path, **options)
    except Exception as err:  # a corrupt or incomplete folder: say which and why, no traceback
        raise ServeStartError(f"cannot load the model in {path}: {type(err).__name__}: {err}") from None


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          *, max_num_seqs: int = 4, max_model_len: int | None = 2048, log_level: str = "info",
          dtype: str = "float32", quantize: str | None = None, api_key: str | None = None,
          max_tokens_limit: int | None = None, max_concurrent_requests: int = 256,
          max_body_bytes: int = 1 << 20, engine_kind: str = "lmforge", rag_index: str | None = None,
          rag_system_prompt: str | None = None, rag_rerank: bool = False, enable_prefix_caching: bool = True,
          max_num_batched_tokens: int | None = None, announce: Callable[..., None] = print) -> None:
    """Load ``model_dir`` (a model folder, or a Llama ``.gguf`` file, converted once into ``$LMFORGE_HOME/models``)
    and serve it with uvicorn until SIGTERM / Ctrl-C.  The model name defaults to the folder name.
    ``engine_kind="vllm"`` hands the folder to vLLM's own OpenAI server instead (GPU machines with vLLM installed).

    Raises ``ServeStartError`` when the server cannot start (port in use, bad host, model folder missing or
    unreadable, HTTP server failing to start).  On SIGTERM or Ctrl-C, requests still generating end with
    ``finish_reason="abort"`` (streams get that last chunk and ``[DONE]``) and the function returns normally."""
    if engine_kind not in ("lmforge", "vllm"):
        raise ValueError(f"engine must be 'lmforge' or 'vllm', got {engine_kind!r}")
    if str(model_dir).endswith(".gguf"):
        from lmforge.model.pretrained import materialize_gguf

        if not Path(model_dir).is_file():
            raise ServeStartError(f"GGUF file {model_dir} does not exist")
        try:
            model_dir = materialize_gguf(Path(model_dir))
        except Exception as err:  # not a GGUF, or not a Llama one
            raise ServeStartError(f"cannot convert {model_dir}: {type(err).__name__}: {err}") from None
    name = model_name or Path(model_dir).resolve().name
    if engine_kind == "vllm":
        from lmforge.serve.vllm_backend import serve_with_vllm

        serve_with_vllm(model_dir, host, port, name, max_model_len, max_num_seqs, api_key)
        return
    sock = _listen(host, port)
    try:
        engine = load_engine(model_dir, max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype,
                              quantize=quantize, enable_prefix_caching=enable_prefix_caching,
                              max_num_batched_tokens=max_num_batched_tokens)
        app = create_app(engine, name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_concurrent_requests=max_concurrent_requests, max_body_bytes=max_body_bytes)
        if rag_index is not None:  # answer /v1/chat/completions from a knowledge base, add /v1/rag/query
            from lmforge.rag.http import attach_knowledge_base

            attach_knowledge_base(app, rag_index, system_prompt=rag_system_prompt, rerank=rag_rerank)
        _run(app, engine, sock, host, port, name, log_level, announce)
    finally:
        sock.close()


def _run(app: FastAPI, engine: Engine, sock, host: str, port: int, name: str, log_level: str,
         announce: Callable[..., None]) -> None:
    import uvicorn

    # uvicorn answers HTTP on a second thread; this (main) thread, which loaded the model, runs the engine's steps:
    # PyTorch's CPU kernels run about twice as fast here as on a fresh thread (see lmforge/serve/engine.py)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))  # (it leaves signals to us: not main thread)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmforge-http", daemon=True)
    signalled: list[int] = []

    def on_signal(signum: int, frame) -> None:  # finish the current step, then shut down (see below)
        signalled.append(signum)
        engine.request_stop()

    if threading.current_thread() is threading.main_thread():  # SIGTERM and Ctrl-C: the same clean shutdown
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    http.start()
    deadline = time.monotonic() + 60
    while not server.started and http.is_alive() and time.monotonic() < deadline and not signalled:
        time.sleep(0.02)
    if not server.started and not signalled:
        server.should_exit = True
        engine.shutdown()
        raise ServeStartError(f"the HTTP server did not start on {host}:{port} (see the log above)")
    prefix = "on" if engine.enable_prefix_caching else "off"
    exact = engine.dtype == "float32"
    announce(f"lmforge serve: {name} on http://{host}:{port}/v1 · dtype {engine.dtype}"
             f"{' · ' + engine.quantize + ' weights' if engine.quantize else ''} · prefix caching {prefix}"
             f"{'' if exact else ' · seeded outputs may vary with batching and prefix caching (docs/serving.md)'}",
             flush=True)
    try:
        engine.run_forever(stop=lambda: not http.is_alive() or bool(signalled))
    finally:
        engine.shutdown()  # requests still generating end with finish_reason "abort"; their streams get [DONE]
        server.should_exit = True  # then uvicorn lets open responses finish and closes
        http.join(timeout=15)
    if not signalled:
        raise ServeStartError("the HTTP server stopped unexpectedly (see the log above)")
