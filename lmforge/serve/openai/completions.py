"""``POST /v1/completions``: legacy completions (string / token-id prompts, ``echo``, legacy logprobs), with the same
output constraints as chat (``response_format``, ``guided_*``, ``structured_outputs``)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from lmforge.serve.openai.common import APIError, ServerContext, collect, finish_reason, sse, streaming
from lmforge.serve.openai.guided import spec_from_request
from lmforge.serve.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)


class CompletionServing:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, request: Request):
        ctx = self.ctx
        started = time.monotonic()
        ctx.check_model(req.model)
        if (bad := req.unsupported()) is not None:
            raise APIError(400, bad[1], param=bad[0])
        spec, field = spec_from_request(req)
        make = await ctx.processor_factory(spec, field)
        prompts = req.prompts()
        prompt_ids = [ctx.engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        prompt_texts = [p if isinstance(p, str) else ctx.engine.decode(p) for p in prompts]
        fan = ctx.submit(req, prompt_ids, req.max_tokens, ctx.engine.eos_token_ids, "prompt", make)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = sum(len(p) for p in prompt_ids)
        total = len(prompts) * req.n

        if req.stream:
            async def events():
                completion = 0
                texts, reasons = [""] * total, [None] * total  # what --record stores once the stream ends

                def chunk(choices, usage=None):
                    return sse(CompletionStreamResponse(id=rid, created=created, model=ctx.model_name,
                                                        choices=choices, usage=usage))

                if req.echo:
                    for i in range(total):
                        yield chunk([CompletionChoice(index=i, text=prompt_texts[i // req.n])])
                offsets = [0] * total
                async for i, out in fan.outputs():
                    texts[i] += out.text or ""
                    if out.finished:
                        completion += out.completion_tokens
                        reasons[i] = finish_reason(out)
                    if out.text or out.finished or out.logprobs:
                        lp = ctx.completion_logprobs(out.logprobs, offsets[i])
                        if lp is not None and lp.tokens:
                            offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                        yield chunk([CompletionChoice(index=i, text=out.text, finish_reason=finish_reason(out),
                                                      logprobs=lp)])
                await ctx.record(rid, "completion", {"prompt": prompt_texts}, req,
                                 [{"text": t, "finish_reason": r} for t, r in zip(texts, reasons)], n_prompt,
                                 completion, started)
                if req.include_usage:
                    yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion,
                                              total_tokens=n_prompt + completion,
                                              speculative=fan.speculative_usage()))

            return streaming(events(), fan)

        texts, reasons, completion, lps = await collect(request, fan, total)
        choices = [CompletionChoice(index=i, text=(prompt_texts[i // req.n] if req.echo else "") + texts[i],
                                    finish_reason=reasons[i],
                                    logprobs=ctx.completion_logprobs(
                                        lps[i] if req.logprobs is not None else None,
                                        len(prompt_texts[i // req.n]) if req.echo else 0))
                   for i in range(total)]
        usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion,
                          speculative=fan.speculative_usage())
        await ctx.record(rid, "completion", {"prompt": prompt_texts}, req,
                         [{"text": texts[i], "finish_reason": reasons[i]} for i in range(total)], n_prompt, completion,
                         started)
        return CompletionResponse(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage)


def router(serving: CompletionServing) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await serving.create(req, request)

    return r
