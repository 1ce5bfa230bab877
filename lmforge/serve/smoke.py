"""The "serve smoke" stage: start the real HTTP server, talk to it with the official ``openai`` client, stop it."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from lmforge.serve.api import create_app
from lmforge.serve.engine import Engine


@contextlib.contextmanager
def running_server(engine: Engine, model_name: str, host: str = "127.0.0.1",
                   startup_timeout: float = 30.0, **app_options) -> Iterator[str]:
    """Serve ``engine`` with uvicorn in a background thread on a free port; yields the base URL (``.../v1``).

    The listening socket is bound before the server starts, so the port cannot be taken in between.
    ``app_options`` go to ``create_app`` (``api_key``, ``max_tokens_limit``, ...)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine, model_name, **app_options), host=host, port=port, log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmforge-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def smoke_test(model_dir: str | os.PathLike, *, max_tokens: int = 32, model_name: str | None = None,
               chat_message: str = "Say hello in one short sentence.",
               completion_prompt: str = "The quick brown fox") -> dict:
    """Serve ``model_dir`` on a free 127.0.0.1 port, send one chat and one completion request through the ``openai``
    client (greedy, so the answers are reproducible), stop the server.

    Returns ``{"chat", "completion", "port", "model", "latency_s", "tokens_per_s", "completion_tokens",
    "finish_reasons"}``: ``latency_s`` is the wall time of the chat request, ``tokens_per_s`` the completion tokens
    of both requests over their total wall time (HTTP included)."""
    from openai import OpenAI

    name = model_name or Path(model_dir).resolve().name
    engine = Engine.from_folder(model_dir, max_num_seqs=1, max_model_len=2048)
    result: dict = {}

    def converse() -> None:  # the client side, on a second thread: the engine steps on this one (see engine.py)
        try:
            with running_server(engine, name) as base_url:
                client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
                t0 = time.perf_counter()
                result["chat"] = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": chat_message}], max_tokens=max_tokens,
                    temperature=0.0)
                t1 = time.perf_counter()
                result["comp"] = client.completions.create(model=name, prompt=completion_prompt,
                                                           max_tokens=max_tokens, temperature=0.0)
                result.update(base_url=base_url, times=(t0, t1, time.perf_counter()))
        except BaseException as exc:  # re-raised on the calling thread below
            result["error"] = exc

    client_thread = threading.Thread(target=converse, name="lmforge-smoke-client", daemon=True)
    client_thread.start()
    try:
        engine.run_forever(stop=lambda: not client_thread.is_alive())
    finally:
        engine.shutdown()
        client_thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    chat, comp, base_url, (t0, t1, t2) = result["chat"], result["comp"], result["base_url"], result["times"]
    tokens = chat.usage.completion_tokens + comp.usage.completion_tokens
    return {
        "chat": chat.choices[0].message.content or "",
        "completion": comp.choices[0].text,
        "port": int(base_url.rsplit(":", 1)[1].split("/")[0]),
        "model": name,
        "latency_s": round(t1 - t0, 4),
        "tokens_per_s": round(tokens / max(t2 - t0, 1e-9), 2),
        "completion_tokens": tokens,
        "finish_reasons": [chat.choices[0].finish_reason, comp.choices[0].finish_reason],
    }
