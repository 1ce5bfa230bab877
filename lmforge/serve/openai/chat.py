"""``POST /v1/chat/completions``: messages (with tools, tool calls and tool results) → the chat template → the engine,
with an optional output constraint (a tool-call grammar, ``response_format`` or vLLM's ``guided_*``), answered as JSON
or as server-sent ``chat.completion.chunk`` events.

Tool calls (``lmforge.serve.tools``): with ``tools`` and ``tool_choice`` other than ``"none"`` the output is
constrained to the tool-call format, parsed back into ``message.tool_calls`` with ``finish_reason: "tool_calls"``;
streamed, each call starts with a delta holding its ``index``, ``id``, ``type`` and ``function.name`` and continues
with ``function.arguments`` in pieces.  Streaming and non-streaming answers come from the same parser, so the
concatenated stream equals the non-streaming response for the same seed.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from lmforge.serve.engine import ChatTemplateError
from lmforge.serve.openai.common import APIError, ServerContext, collect, finish_reason, sse, streaming
from lmforge.serve.openai.guided import spec_from_request
from lmforge.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from lmforge.serve.tools import (
    ParseEvent,
    ToolCallParser,
    ToolError,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
    render_messages,
    tool_call_grammar,
)


class ChatServing:
    """Turns one chat request into engine requests (``n`` choices) and their outputs into OpenAI's response."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def prepare(self, req: ChatCompletionRequest) -> tuple[list[int], object, str | None, bool]:
        """``(prompt ids, grammar spec or None, the field it came from, tool calls expected)``; 400s on bad input."""
        ctx = self.ctx
        try:
            for m in req.messages:
                m.text()  # content parts other than text: a clear 400
            tools = parse_tools(req.tools)
            choice = parse_tool_choice(req.tool_choice, tools)
            messages = render_messages(req.messages, tools, choice)
        except ToolError as err:
            raise APIError(400, str(err), param=err.param) from None
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        spec, field = spec_from_request(req)
        tool_spec = tool_call_grammar(tools, choice, req.parallel_tool_calls)
        if tool_spec is not None and spec is not None:
            raise APIError(400, f"{field} cannot be combined with tools unless tool_choice is 'none'", param=field)
        if tool_spec is not None:
            spec, field = tool_spec, "tools"
        try:
            prompt_ids = ctx.engine.encode_chat(messages)
        except (ChatTemplateError, ValueError) as err:
            raise APIError(400, str(err), param="messages") from None
        return prompt_ids, spec, field, tool_spec is not None

    async def create(self, req: ChatCompletionRequest, request: Request):
        ctx = self.ctx
        started = time.monotonic()
        ctx.check_model(req.model)
        if (bad := req.unsupported()) is not None:
            raise APIError(400, bad[1], param=bad[0])
        for hook in ctx.chat_hooks:  # RAG, personas ...: the first that answers wins
            answer = await hook(req, request)
            if answer is not None:
                if isinstance(answer, dict) and isinstance(answer.get("id"), str) and answer.get("choices"):
                    await self._record_hook_answer(req, answer, started)  # (a hook's stream is not recorded)
                return answer
        prompt_ids, spec, field, with_tools = self.prepare(req)
        make = await ctx.processor_factory(spec, field)
        fan = ctx.submit(req, [prompt_ids], req.effective_max_tokens, ctx.engine.chat_stop_token_ids, "messages",
                         make)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = len(prompt_ids)
        if req.stream:
            return streaming(self._events(req, fan, rid, created, n_prompt, with_tools, started), fan)

        texts, reasons, completion, lps = await collect(request, fan, req.n)
        choices = []
        for i in range(req.n):
            message, reason = ChatCompletionMessage(content=texts[i]), reasons[i]
            if with_tools:
                content, calls = parse_tool_calls(texts[i])
                message = ChatCompletionMessage(content=content, tool_calls=[
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
                    or None)
                if calls and reason == "stop":
                    reason = "tool_calls"
            choices.append(ChatCompletionChoice(index=i, message=message, finish_reason=reason,
                                                logprobs=ctx.chat_logprobs(lps[i] if req.logprobs else None)))
        usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion, total_tokens=n_prompt + completion,
                          speculative=fan.speculative_usage())
        await ctx.record(rid, "chat", _recorded_request(req), req,
                         [_recorded_choice(c.message.content, c.finish_reason, c.message.tool_calls) for c in choices],
                         n_prompt, completion, started)
        return ChatCompletionResponse(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage)

    async def _record_hook_answer(self, req: ChatCompletionRequest, answer: dict, started: float) -> None:
        usage = answer.get("usage") or {}
        choices = [_recorded_choice((c.get("message") or {}).get("content"), c.get("finish_reason"), None)
                   for c in answer["choices"] if isinstance(c, dict)]
        await self.ctx.record(answer["id"], "chat", _recorded_request(req), req, choices,
                              int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), started)

    async def _events(self, req: ChatCompletionRequest, fan, rid: str, created: int, n_prompt: int,
                      with_tools: bool, started: float):
        ctx = self.ctx
        parsers = [ToolCallParser() for _ in range(req.n)] if with_tools else None
        completion = 0
        texts, reasons = [""] * req.n, [None] * req.n  # what --record stores once the stream ends

        def chunk(choices, usage=None):
            return sse(ChatCompletionStreamResponse(id=rid, created=created, model=ctx.model_name, choices=choices,
                                                    usage=usage))

        for i in range(req.n):
            yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for i, out in fan.outputs():
            texts[i] += out.text or ""
            if out.finished:
                completion += out.completion_tokens
                reasons[i] = finish_reason(out)
            logprobs = ctx.chat_logprobs(out.logprobs)
            if parsers is None:
                if out.text or out.finished or out.logprobs:
                    yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=out.text or None),
                                                            finish_reason=finish_reason(out), logprobs=logprobs)])
                continue
            events = parsers[i].feed(out.text) + (parsers[i].finish() if out.finished else [])
            for ev in events:
                yield chunk([ChatCompletionStreamChoice(index=i, delta=_delta(ev), logprobs=logprobs)])
                logprobs = None  # the tokens' logprobs go with the first piece of their text
            if out.finished or logprobs is not None:
                reason = finish_reason(out)
                if reason == "stop" and parsers[i].calls:
                    reason = "tool_calls"
                yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason,
                                                        logprobs=logprobs)])
        if ctx.recorder is not None:
            recorded = []
            for i in range(req.n):
                content, calls = parse_tool_calls(texts[i]) if with_tools else (texts[i], [])
                reason = "tool_calls" if calls and reasons[i] == "stop" else reasons[i]
                recorded.append(_recorded_choice(content, reason, calls))
            await ctx.record(rid, "chat", _recorded_request(req), req, recorded, n_prompt, completion, started)
        if req.include_usage:
            yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion,
                                      total_tokens=n_prompt + completion, speculative=fan.speculative_usage()))


def _recorded_request(req: ChatCompletionRequest) -> dict:
    out: dict = {"messages": [m.model_dump(exclude_none=True) for m in req.messages]}
    if req.tools:
        out["tools"] = req.tools
    return out


def _recorded_choice(content: str | None, reason: str | None, calls) -> dict:
    out: dict = {"text": content or "", "finish_reason": reason}
    if calls:
        out["tool_calls"] = [{"name": c.function.name if hasattr(c, "function") else c.name,
                              "arguments": c.function.arguments if hasattr(c, "function") else c.arguments}
                             for c in calls]
    return out


def _delta(ev: ParseEvent) -> DeltaMessage:
    if ev.index is None:
        return DeltaMessage(content=ev.content)
    if ev.name is not None:  # a call starts: index, id, type and name first, arguments after
        return DeltaMessage(tool_calls=[DeltaToolCall(index=ev.index, id=ev.id, type="function",
                                                      function=FunctionCall(name=ev.name, arguments=""))])
    return DeltaMessage(tool_calls=[DeltaToolCall(index=ev.index, function=FunctionCall(arguments=ev.arguments))])


def router(serving: ChatServing) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await serving.create(req, request)

    return r
