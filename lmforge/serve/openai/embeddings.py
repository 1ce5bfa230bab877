"""``POST /v1/embeddings``: mean-pooled final hidden states of the served model (float or base64)."""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter

from lmforge.serve.engine import PromptTooLongError
from lmforge.serve.openai.common import MAX_CHOICES, APIError, ServerContext
from lmforge.serve.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo


class EmbeddingServing:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        ctx, engine = self.ctx, self.ctx.engine
        ctx.check_model(req.model)
        hidden = engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions must be {hidden} for this model", param="dimensions")
        inputs = [engine.encode(x, add_special_tokens=False) if isinstance(x, str) else list(x) for x in req.inputs()]
        if len(inputs) > MAX_CHOICES * 4:
            raise APIError(400, f"at most {MAX_CHOICES * 4} inputs per request, got {len(inputs)}", param="input")
        ctx.limiter.acquire()
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
            ctx.limiter.release()
        data = []
        for i, v in enumerate(vectors):
            emb = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                   else v.tolist())
            data.append(EmbeddingData(index=i, embedding=emb))
        n = sum(len(x) for x in inputs)
        return EmbeddingResponse(data=data, model=ctx.model_name, usage=UsageInfo(prompt_tokens=n, total_tokens=n))


def router(serving: EmbeddingServing) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        return await serving.create(req)

    return r
