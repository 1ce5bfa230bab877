"""HTTP: ``POST /v1/rag/query`` and retrieval-augmented ``POST /v1/chat/completions`` on the lmforge server.

``rag_router(answerer)`` returns a FastAPI ``APIRouter`` with ``/v1/rag/query`` (any FastAPI app can mount it).
Request: ``{"question": str, "history": [{"role", "content"}], "k": int, "mode": "hybrid"|"dense"|"bm25",
"path_prefix": str, "types": [str], "stream": bool}``.  Response: ``RagAnswer.to_dict()``; streamed, each event is
``{"delta": text}`` and the last ``{"final": {...}}``, then ``[DONE]``.

``attach_rag(app, answerer)`` puts that route on an app made by ``lmforge.serve.openai.create_app`` and answers its
``/v1/chat/completions`` from the knowledge base (a chat hook: ``add_chat_hook``), so existing OpenAI clients get
grounded answers:

* the last message (a user turn) is the question; earlier user / assistant turns are the history (follow-ups are
  rewritten into standalone questions); the request's system message, if any, is the persona (else the answerer's);
* generation uses the server's engine with the request's ``temperature`` (default 0: grounded answers are greedy),
  ``top_p``, ``seed`` and ``max_tokens``; ``n`` must be 1;
* the response is a normal ``chat.completion`` (or ``chat.completion.chunk`` stream) plus one extra field ``rag``:
  ``{"refused", "standalone_question", "citations": [...], "sources": [...]}`` (on the last chunk when streaming);
  the official ``openai`` client keeps it in ``response.model_extra["rag"]``;
* per request, ``extra_body={"rag": {"k": 3, "mode": "bm25", "path_prefix": "django/", "types": ["html"]}}``
  changes retrieval, and ``extra_body={"rag": false}`` skips it (the plain model answers).

Requests go through the app's own middleware (API key, body size) and error handlers as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool

from lmforge.rag.answer import Answerer, EngineGenerator, RagAnswer
from lmforge.rag.embed import query_vector
from lmforge.rag.index import Filters
from lmforge.serve.protocol import ChatCompletionRequest


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class RagQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    history: list[Message] = []
    k: int | None = Field(None, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] | None = None
    path_prefix: str | None = None
    types: list[str] | None = None
    stream: bool = False


class RagChatOptions(BaseModel):
    """The ``rag`` object a chat-completions request may carry (``extra_body`` in the openai client)."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] | None = None
    path_prefix: str | None = None
    types: list[str] | None = None


def _with_retrieval(base: Answerer, k: int | None, mode: str | None, path_prefix: str | None,
                    types: list[str] | None, **changes) -> Answerer:
    filters = Filters(path_prefix, types) if (path_prefix or types) else base.filters
    return base.with_options(k=k or base.k, mode=mode or base.mode, filters=filters, **changes)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def rag_router(answerer: Answerer) -> APIRouter:
    """A router with ``POST /v1/rag/query`` answering from ``answerer``'s knowledge base."""
    router = APIRouter()

    @router.post("/v1/rag/query")
    async def rag_query(q: RagQuery):
        ans = _with_retrieval(answerer, q.k, q.mode, q.path_prefix, q.types)
        history = [m.model_dump() for m in q.history]
        if not q.stream:
            result = await asyncio.to_thread(ans.ask, q.question, history)
            return result.to_dict()

        async def events():
            stream = ans.stream(q.question, history)
            try:
                async for ev in iterate_in_threadpool(stream):
                    yield _sse({"final": ev.final.to_dict()} if ev.final else {"delta": ev.delta})
            finally:
                await asyncio.to_thread(stream.close)  # a client that left stops the generation
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return router


def rag_payload(result: RagAnswer) -> dict:
    """The non-standard ``rag`` field of a retrieval-augmented chat completion."""
    d = result.to_dict()
    return {k: d[k] for k in ("refused", "standalone_question", "citations", "sources")}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


def _chat_hook(app: FastAPI, answerer: Answerer):
    engine = app.state.engine
    model_name = app.state.model_name

    async def rag_chat_completions(req: ChatCompletionRequest, request: Request):
        """Answers a chat request from the knowledge base; ``rag: false`` in the body passes it to the plain model."""
        raw = (await request.json()).get("rag", True)
        if raw is False:
            return None
        try:
            opts = RagChatOptions.model_validate({} if raw is True else raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in ("rag", *first["loc"]))
            return _error(400, f"{where}: {first['msg']}", param=where)
        for name in ("tools", "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs"):
            if getattr(req, name, None):
                return _error(400, f"{name} is not supported when answering from the knowledge base; send "
                                   "`rag: false` to ask the model itself", param=name)
        if req.n != 1:
            return _error(400, "n must be 1 when answering from the knowledge base", param="n")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            return _error(400, "the last message must be a non-empty user message (the question)", param="messages")
        persona = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        history = [m for m in messages[:-1] if m["role"] in ("user", "assistant")]
        gen = EngineGenerator(engine, temperature=req.temperature or 0.0, top_p=req.top_p or 1.0, seed=req.seed)
        ans = _with_retrieval(answerer, opts.k, opts.mode, opts.path_prefix, opts.types, generator=gen,
                              system_prompt=persona or answerer.system_prompt,
                              max_tokens=req.effective_max_tokens or answerer.max_tokens)
        question = messages[-1]["content"]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage() -> dict:
            return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                    "total_tokens": gen.prompt_tokens + gen.completion_tokens}

        if not req.stream:
            result = await asyncio.to_thread(ans.ask, question, history)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                                 "finish_reason": gen.finish_reason or "stop", "logprobs": None}],
                    "usage": usage(), "rag": rag_payload(result)}

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                         **extra})

        async def events():
            stream = ans.stream(question, history)
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for ev in iterate_in_threadpool(stream):
                    if ev.final is not None:
                        yield chunk({}, gen.finish_reason or "stop", rag=rag_payload(ev.final))
                    elif ev.delta:
                        yield chunk({"content": ev.delta})
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "choices": [], "usage": usage()})
            finally:
                await asyncio.to_thread(stream.close)  # a client that left stops the generation
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return rag_chat_completions


def attach_rag(app: FastAPI, answerer: Answerer, *, chat: bool = True) -> None:
    """Add ``/v1/rag/query`` to ``app`` (from ``lmforge.serve.openai.create_app``) and, with ``chat``, answer its
    ``/v1/chat/completions`` from the knowledge base.  An answerer without a generator uses the app's engine."""
    engine = getattr(app.state, "engine", None)
    if answerer.generator is None and engine is not None:
        answerer.generator = EngineGenerator(engine)
    app.state.rag = answerer
    app.include_router(rag_router(answerer))
    if chat:
        if engine is None or getattr(app.state, "ctx", None) is None:
            raise ValueError("attach_rag(chat=True) needs an app from lmforge.serve.openai.create_app")
        from lmforge.serve.openai import add_chat_hook

        add_chat_hook(app, _chat_hook(app, answerer))


def attach_knowledge_base(app: FastAPI, index_dir: str | os.PathLike, *, system_prompt: str | None = None,
                          k: int = 4, min_score: float = 0.3, rerank: bool = False) -> Answerer:
    """Load the knowledge base in ``index_dir`` and ``attach_rag`` it to the app, answering with the app's engine
    (and re-ranking with it, constrained to yes / no, when ``rerank``)."""
    from lmforge.rag.index import KnowledgeBase
    from lmforge.rag.judge import EngineJudge

    engine = app.state.engine
    kb = KnowledgeBase.load(index_dir)
    if kb.embedder is not None:  # query embeddings run on the engine's driving thread, not on request threads
        kb.embedder = _OnDriver(kb.embedder, engine)
    answerer = Answerer(kb, EngineGenerator(engine), k=k, min_score=min_score,
                        system_prompt=system_prompt, reranker=EngineJudge(engine) if rerank else None)
    attach_rag(app, answerer)
    return answerer


class _OnDriver:
    """An embedder whose ``embed`` runs on the engine's driving thread (``Engine.call_on_driver``): PyTorch work on
    the server's request threads would give each its own OpenMP pool and slow every decode step after it (see
    lmforge/serve/engine.py)."""

    def __init__(self, embedder, engine) -> None:
        self.embedder, self.engine = embedder, engine

    def embed(self, texts: list[str]):
        return self.engine.call_on_driver(lambda: self.embedder.embed(texts))

    def embed_query(self, query: str):
        return self.engine.call_on_driver(lambda: query_vector(self.embedder, query))

    def __getattr__(self, name: str):
        return getattr(self.embedder, name)
