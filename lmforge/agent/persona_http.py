"""Personas on the OpenAI API: ``model: "persona:<name>"`` on ``/v1/chat/completions`` (a chat hook), listed in
``/v1/models``.  The request's ``user`` field names the user whose memory the persona keeps; the answer carries a
non-standard ``persona`` field (stop reason, steps, the trace: guardrail decisions, tool calls and results)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from lmforge.agent.backends import ModelBackend
from lmforge.agent.persona import Persona, PersonaSet

PREFIX = "persona:"
BackendFactory = Callable[[Persona, Any], ModelBackend]


def _error(message: str, param: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=400)


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, default=str)}\n\n"


def attach_personas(app: FastAPI, personas: PersonaSet, backend: BackendFactory | None = None) -> None:
    """Serve each persona as ``persona:<name>`` on an app from ``lmforge.serve.openai.create_app``.  ``backend(persona,
    request)`` gives the model backend per request (default: the app's engine, grammar-constrained tool calls)."""
    ctx = app.state.ctx
    ctx.extra_models.extend(PREFIX + name for name in personas.personas)
    engine = app.state.engine

    def engine_backend(persona: Persona, req: Any) -> ModelBackend:
        from lmforge.agent.backends import EngineBackend

        card = persona.card
        return EngineBackend(engine, temperature=card.temperature if req.temperature is None else req.temperature,
                             max_tokens=req.effective_max_tokens or card.max_tokens, seed=req.seed)

    make_backend = backend or engine_backend

    async def persona_chat(req: Any, request: Request):
        if not (req.model or "").startswith(PREFIX):
            return None
        persona = personas.personas[req.model[len(PREFIX):]]  # the model check let only served names through
        for name in ("tools", "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs"):
            if getattr(req, name, None):
                return _error(f"{name} is not supported with a persona (its tools come from its card)", name)
        if req.n != 1:
            return _error("n must be 1 with a persona", "n")
        body = await request.json()
        user = body.get("user")
        if user is not None and (not isinstance(user, str) or not user.strip() or len(user) > 256):
            return _error("user must be a non-empty string of at most 256 characters", "user")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages if m.role != "tool"]
        except ValueError as err:
            return _error(str(err), "messages")
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            return _error("the last message must be a non-empty user message", "messages")
        model_backend = make_backend(persona, req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def extra(result) -> dict:
            return {"name": persona.name, "stop_reason": result.stop_reason, "steps": result.steps,
                    "trace": result.trace}

        def usage(result) -> dict:
            return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens}

        if not req.stream:
            result = await asyncio.to_thread(persona.respond, messages, model_backend, user)
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": usage(result), "persona": extra(result)}

        def chunk(delta: dict, finish: str | None = None, **more: Any) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **more})

        async def events():
            stream = persona.stream(messages, model_backend, user)
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for ev in iterate_in_threadpool(stream):
                    if ev.type == "delta" and ev.text:
                        yield chunk({"content": ev.text})
                    elif ev.type == "final" and ev.result is not None:
                        if ev.result.steps == 0 or ev.result.stop_reason != "answer":  # canned / stopped: not streamed
                            yield chunk({"content": ev.result.answer})
                        yield chunk({}, "stop", persona=extra(ev.result))
                        if req.include_usage:
                            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": req.model, "choices": [], "usage": usage(ev.result)})
            finally:
                await asyncio.to_thread(stream.close)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    ctx.chat_hooks.insert(0, persona_chat)  # before RAG's hook, which answers every other chat request
