"""``create_app``: the FastAPI app of one served engine, its middleware, OpenAI error envelope and routers.

Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for a bad request:
validation errors and malformed JSON are 400 (not FastAPI's 422), an unknown model 404, a too-long prompt 400,
a missing / wrong API key 401 (with ``api_key`` set), a body over ``max_body_bytes`` 413, and more than
``max_concurrent_requests`` requests in flight 429.  A client that disconnects (streaming or not) has its requests
aborted, which frees their cache slots.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.engine import Engine
from lmforge.serve.openai import chat, completions, embeddings, feedback, models
from lmforge.serve.openai.common import APIError, ChatHook, Guard, Limiter, ServerContext, error_response, \
    validation_message

log = logging.getLogger("lmforge.serve")


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_tokens_limit: int | None = None,
               max_concurrent_requests: int = 256, max_body_bytes: int = 1 << 20, recorder=None) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``engine`` as model ``model_name``.

    ``api_key``: require ``Authorization: Bearer <api_key>`` on ``/v1/*``.  ``max_tokens_limit``: reject requests
    asking for more completion tokens (400).  ``max_concurrent_requests``: HTTP requests generating at once before
    a 429.  ``max_body_bytes``: larger request bodies get a 413.  ``recorder`` (``lmforge.feedback.store.Recorder``):
    store every answer and take ``POST /v1/feedback`` on them."""
    from lmforge.serve.metrics import PrometheusMetrics

    app = FastAPI(title="lmforge", description="OpenAI-compatible API served by lmforge")
    ctx = ServerContext(engine, model_name, Limiter(max_concurrent_requests), max_tokens_limit, recorder=recorder)
    app.state.ctx = ctx
    app.state.engine = engine
    app.state.model_name = model_name
    metrics = PrometheusMetrics(engine, model_name)
    engine.metrics = metrics
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError):
        message, param = validation_message(err)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException):
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        return error_response(err.status_code, str(err.detail), type_, code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")

    app.include_router(models.router(ctx, metrics))
    app.include_router(chat.router(chat.ChatServing(ctx)))
    app.include_router(completions.router(completions.CompletionServing(ctx)))
    app.include_router(embeddings.router(embeddings.EmbeddingServing(ctx)))
    app.include_router(feedback.router(feedback.FeedbackServing(ctx)))
    return app


def add_chat_hook(app: FastAPI, hook: ChatHook) -> None:
    """Let ``hook(request_model, request)`` see every ``/v1/chat/completions`` request (after the model check) and
    answer it by returning a response; returning ``None`` passes it on (to the next hook, then the plain model)."""
    ctx: ServerContext = app.state.ctx
    ctx.chat_hooks.append(hook)
