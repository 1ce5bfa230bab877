"""OpenAI-compatible HTTP API over an ``Engine``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``.

Each choice of a request (``n`` choices x prompts) becomes one engine request; their outputs are handed from the engine
thread to the event loop and either collected (JSON) or streamed as server-sent events ending in ``data: [DONE]``.
Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for a bad request:
validation errors and malformed JSON are 400 (not FastAPI's 422), an unknown model 404, a too-long prompt 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.engine import ChatTemplateError, Engine, GenerationOutput, PromptTooLongError
from lmforge.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from lmforge.serve.sampling import SamplingParams

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


class _Fanout:
    """Engine requests of one HTTP request; their outputs arrive on an asyncio queue as ``(choice_index, output)``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, GenerationOutput]] = asyncio.Queue()
        self.live: dict[str, int] = {}

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
        for rid in list(self.live):
            self.engine.abort(rid)
        self.live.clear()


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``engine`` as model ``model_name``."""
    app = FastAPI(title="lmforge", description="OpenAI-compatible API served by lmforge")
    app.state.engine = engine
    app.state.model_name = model_name

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
            max_tokens=max_tokens,
            stop=req.stop_list,
            stop_token_ids=sorted(stop_token_ids),
            seed=None if req.seed is None else req.seed + i,  # n choices with one seed differ, reproducibly
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        )

    def submit(req, prompts: list[list[int]], max_tokens: int | None, stop_token_ids, prompt_param: str) -> _Fanout:
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
        fan = _Fanout(engine)
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

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
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
                    if out.text or out.finished:
                        delta = DeltaMessage(content=out.text or None)
                        yield chunk([ChatCompletionStreamChoice(index=i, delta=delta,
                                                                finish_reason=_reason(out))])
                if req.include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion,
                                              total_tokens=n_prompt + completion))

            return streaming(events(), fan)

        texts, reasons, completion = await _collect(fan, req.n)
        choices = [ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=texts[i]),
                                        finish_reason=reasons[i]) for i in range(req.n)]
        usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion)
        return ChatCompletionResponse(id=rid, created=created, model=model_name, choices=choices, usage=usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
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
                async for i, out in fan.outputs():
                    if out.finished:
                        completion += out.completion_tokens
                    if out.text or out.finished:
                        yield chunk([CompletionChoice(index=i, text=out.text, finish_reason=_reason(out))])
                if req.include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion,
                                              total_tokens=n_prompt + completion))

            return streaming(events(), fan)

        texts, reasons, completion = await _collect(fan, total)
        choices = [CompletionChoice(index=i, text=(prompt_texts[i // req.n] if req.echo else "") + texts[i],
                                    finish_reason=reasons[i]) for i in range(total)]
        usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion)
        return CompletionResponse(id=rid, created=created, model=model_name, choices=choices, usage=usage)

    return app


def _reason(out: GenerationOutput) -> str | None:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


async def _collect(fan: _Fanout, count: int) -> tuple[list[str], list[str | None], int]:
    texts: list[list[str]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    completion = 0
    try:
        async for i, out in fan.outputs():
            texts[i].append(out.text)
            if out.finished:
                reasons[i] = _reason(out)
                completion += out.completion_tokens
    finally:
        fan.abort()  # no-op when all finished; frees slots if the client disconnected mid-request
    return ["".join(t) for t in texts], reasons, completion


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          *, max_num_seqs: int = 4, max_model_len: int | None = 2048, log_level: str = "info") -> None:
    """Load ``model_dir`` and serve it with uvicorn until interrupted.  The model name defaults to the folder name."""
    import uvicorn

    engine = Engine.from_folder(model_dir, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    name = model_name or Path(model_dir).resolve().name
    try:
        uvicorn.run(create_app(engine, name), host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()
