"""``GET /v1/models`` (with the serving dtype and weight format), ``GET /health`` and Prometheus ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from lmforge.serve.openai.common import ServerContext
from lmforge.serve.protocol import ModelCard, ModelList


def router(ctx: ServerContext, metrics) -> APIRouter:
    from lmforge.serve.metrics import CONTENT_TYPE_LATEST

    r = APIRouter()

    @r.get("/health")
    async def health():
        return {"status": "ok"}

    @r.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @r.get("/v1/models", response_model=ModelList)
    async def models():
        e = ctx.engine
        return ModelList(data=[ModelCard(id=name, max_model_len=e.max_model_len, dtype=e.dtype, quantize=e.quantize)
                               for name in [ctx.model_name, *ctx.extra_models]])

    return r
