"""A scripted OpenAI-compatible chat endpoint for agent tests (lmforge's own server does not take ``tools`` yet):
each request gets the next scripted turn, streamed as real chat.completion.chunk SSE events."""


import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    body: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def make_app(script: list[Any], requests: list[dict]):
    """``script``: a ``str`` is an answer, a list of ``(name, arguments dict)`` is one turn of tool calls."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await request.json()
        requests.append(req)
        n = len(requests)
        if n > len(script):
            return JSONResponse({"error": {"message": "script exhausted", "type": "invalid_request_error"}}, 400)
        turn = script[n - 1]

        def events() -> Iterator[str]:
            yield _chunk({"role": "assistant", "content": ""})
            if isinstance(turn, str):
                for word in turn.split(" "):
                    yield _chunk({"content": word + " "})
                finish = "stop"
            else:
                for i, (name, args) in enumerate(turn):
                    text = args if isinstance(args, str) else json.dumps(args)
                    yield _chunk({"tool_calls": [{"index": i, "id": f"call_{n}_{i}", "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]})
                    for j in range(0, len(text), 5):
                        yield _chunk({"tool_calls": [{"index": i, "function": {"arguments": text[j:j + 5]}}]})
                finish = "tool_calls"
            yield _chunk({}, finish)
            yield _chunk({}, usage={"prompt_tokens": 10 * n, "completion_tokens": 3, "total_tokens": 10 * n + 3})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextmanager
def fake_openai_server(script: list) -> Iterator:
    """Serve the script with uvicorn on a free 127.0.0.1 port; yields ``(base_url, requests received)``."""
    import uvicorn

    requests: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(make_app(script, requests), log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", requests
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()
