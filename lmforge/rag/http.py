"""HTTP: ``POST /v1/rag/query`` (answer + cited sources, optionally streamed as server-sent events).

``rag_router(answerer)`` returns a FastAPI ``APIRouter`` to mount on the lmforge server (or any FastAPI app).
Request: ``{"question": str, "history": [{"role", "content"}], "k": int, "mode": "hybrid"|"dense"|"bm25",
"path_prefix": str, "types": [str], "stream": bool}``.  Response: ``RagAnswer.to_dict()``; streamed, each event is
``{"delta": text}`` and the last ``{"final": {...}}``, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool

from lmforge.rag.answer import Answerer
from lmforge.rag.index import Filters


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


def _answerer_for(base: Answerer, q: RagQuery) -> Answerer:
    filters = Filters(q.path_prefix, q.types) if (q.path_prefix or q.types) else base.filters
    return Answerer(base.kb, base.generator, k=q.k or base.k, mode=q.mode or base.mode, min_score=base.min_score,
                    system_prompt=base.system_prompt, max_tokens=base.max_tokens, filters=filters)


def rag_router(answerer: Answerer) -> APIRouter:
    """A router with ``POST /v1/rag/query`` answering from ``answerer``'s knowledge base."""
    router = APIRouter()
    lock = asyncio.Lock()  # retrieval (faiss / bm25 / the embedder) runs one query at a time

    @router.post("/v1/rag/query")
    async def rag_query(q: RagQuery):
        ans = _answerer_for(answerer, q)
        history = [m.model_dump() for m in q.history]
        if not q.stream:
            async with lock:
                result = await asyncio.to_thread(ans.ask, q.question, history)
            return result.to_dict()

        async def events():
            async with lock:
                async for ev in iterate_in_threadpool(ans.stream(q.question, history)):
                    body = {"final": ev.final.to_dict()} if ev.final else {"delta": ev.delta}
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return router
