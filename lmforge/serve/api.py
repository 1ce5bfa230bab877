"""``lmforge serve``: load a model folder and serve it over the OpenAI HTTP API until SIGTERM / Ctrl-C.

The HTTP layer itself (one router and serving class per endpoint) is ``lmforge.serve.openai``; ``create_app`` and
``APIError`` are re-exported here for existing callers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from fastapi import FastAPI

from lmforge.serve.engine import Engine
from lmforge.serve.openai import APIError, add_chat_hook, create_app, error_response
from lmforge.serve.speculative import SpeculativeConfig

__all__ = ["APIError", "ServeStartError", "add_chat_hook", "create_app", "error_response", "serve"]


class ServeStartError(RuntimeError):
    """The server could not start (address in use or unknown, model folder missing or unreadable): one clear line."""


def _listen(host: str, port: int):
    """Bind and listen on ``host:port`` now, before the model loads, so a taken port or a bad host fails at once."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        try:
            sock.bind(addr)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        reason = err.strerror or str(err)
        raise ServeStartError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def load_engine(model_dir: str | os.PathLike, **options) -> Engine:
    """``Engine.from_folder``, with a missing, incomplete or corrupt folder reported as one ``ServeStartError``."""
    from lmforge.serve.runner import DTYPES

    if options.get("dtype", "float32") not in DTYPES:  # a bad flag is not a bad model folder
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {options['dtype']!r}")
    if options.get("quantize") not in (None, "int8", "int4"):
        raise ValueError(f"quantize must be int8 or int4, got {options['quantize']!r}")
    path = Path(model_dir)
    if not path.is_dir():
        raise ServeStartError(f"model folder {path} does not exist" if not path.exists()
                              else f"{path} is not a model folder")
    try:
        return Engine.from_folder(path, **options)
    except Exception as err:  # a corrupt or incomplete folder: say which and why, no traceback
        raise ServeStartError(f"cannot load the model in {path}: {type(err).__name__}: {err}") from None


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          *, max_num_seqs: int = 4, max_model_len: int | None = 2048, log_level: str = "info",
          dtype: str = "float32", quantize: str | None = None, api_key: str | None = None,
          max_tokens_limit: int | None = None, max_concurrent_requests: int = 256,
          max_body_bytes: int = 1 << 20, engine_kind: str = "lmforge", rag_index: str | None = None,
          rag_system_prompt: str | None = None, rag_rerank: bool = False, enable_prefix_caching: bool = True,
          max_num_batched_tokens: int | None = None, record: bool = False,
          prefill_chunk_size: int | None = 512, speculative: "SpeculativeConfig | None" = None,
          announce: Callable[..., None] = print,
          personas: list[str] | None = None, persona_state: str | None = None) -> None:
    """Load ``model_dir`` (a model folder, or a Llama ``.gguf`` file, converted once into ``$LMFORGE_HOME/models``)
    and serve it with uvicorn until SIGTERM / Ctrl-C.  The model name defaults to the folder name.
    ``engine_kind="vllm"`` hands the folder to vLLM's own OpenAI server instead (GPU machines with vLLM installed).

    Raises ``ServeStartError`` when the server cannot start (port in use, bad host, model folder missing or
    unreadable, HTTP server failing to start; a draft model that cannot be used).  ``speculative``: speculative
    decoding for every request that can take it (``lmforge.serve.speculative``).  On SIGTERM or Ctrl-C, requests
    still generating end with ``finish_reason="abort"`` (streams get that last chunk and ``[DONE]``) and the function
    returns normally.

    ``record``: a recorded ``serve`` run (registry + ``$LMFORGE_HOME/serve/NAME-RUNID/``, its input the model, so
    lineage runs from an answer back to the model's data) that stores every answer in ``$LMFORGE_HOME/feedback.sqlite``
    and takes ``POST /v1/feedback`` (``lmforge.feedback``)."""
    if engine_kind not in ("lmforge", "vllm"):
        raise ValueError(f"engine must be 'lmforge' or 'vllm', got {engine_kind!r}")
    if str(model_dir).endswith(".gguf"):
        from lmforge.model.pretrained import materialize_gguf

        if not Path(model_dir).is_file():
            raise ServeStartError(f"GGUF file {model_dir} does not exist")
        try:
            model_dir = materialize_gguf(Path(model_dir))
        except Exception as err:  # not a GGUF, or not a Llama one
            raise ServeStartError(f"cannot convert {model_dir}: {type(err).__name__}: {err}") from None
    name = model_name or Path(model_dir).resolve().name
    if engine_kind == "vllm":
        if record:
            raise ValueError("--record needs lmforge's own engine (not --engine vllm)")
        from lmforge.serve.vllm_backend import serve_with_vllm

        serve_with_vllm(model_dir, host, port, name, max_model_len, max_num_seqs, api_key)
        return
    sock = _listen(host, port)
    try:
        persona_set = None
        if personas:  # persona:<name> models (lmforge.agent.persona): cards checked before the model loads
            from lmforge.agent.persona import PersonaSet
            from lmforge.config import ConfigError

            try:
                persona_set = PersonaSet.load(personas, persona_state)
            except ConfigError as err:
                raise ServeStartError(str(err)) from None
        engine = load_engine(model_dir, max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype,
                              quantize=quantize, enable_prefix_caching=enable_prefix_caching,
                              max_num_batched_tokens=max_num_batched_tokens,
                              prefill_chunk_size=prefill_chunk_size, speculative=speculative)
        run_, recorder = (_recording(model_dir, name, dict(dtype=dtype, quantize=quantize, max_model_len=max_model_len,
                                                           max_num_seqs=max_num_seqs))
                          if record else (None, None))
        app = create_app(engine, name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_concurrent_requests=max_concurrent_requests, max_body_bytes=max_body_bytes,
                         recorder=recorder)
        if rag_index is not None:  # answer /v1/chat/completions from a knowledge base, add /v1/rag/query
            from lmforge.rag.http import attach_knowledge_base

            attach_knowledge_base(app, rag_index, system_prompt=rag_system_prompt, rerank=rag_rerank)
        if persona_set is not None:
            from lmforge.agent.persona_http import attach_personas

            attach_personas(app, persona_set)
        if run_ is None:
            _run(app, engine, sock, host, port, name, log_level, announce)
            return
        with run_:
            from lmforge.artifacts import write_json

            write_json(run_.dir / "recording.json", {"db": str(recorder.path.resolve()), "serve_run": run_.run_id,
                                                     "model_lineage": recorder.model_lineage})
            announce(f"recording answers to {recorder.path} as serve run {run_.run_id} ({run_.dir})", flush=True)
            try:
                _run(app, engine, sock, host, port, name, log_level, announce)
            finally:
                run_.metrics.update(recorder.counts())
                recorder.close()
    finally:
        sock.close()


def _recording(model_dir: str | os.PathLike, name: str, options: dict):
    """A ``serve`` run (its input: the model) and the recorder that stores its answers with that run's id."""
    import uuid

    from lmforge.artifacts import StageRun
    from lmforge.feedback.store import Recorder, default_path
    from lmforge.registry import home

    folder = home() / "serve" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    config = {"model": str(Path(model_dir).resolve()), "model_name": name, **options}
    run_ = StageRun("serve", "1", folder, config, inputs={"model": model_dir})
    recorder = Recorder(default_path(), run_.run_id, str(folder.resolve()), config["model"], name,
                        run_.inputs["model"].fingerprint)
    return run_, recorder


def _spec_line(engine: Engine) -> str:
    spec = engine.speculative
    if spec is None:
        return ""
    draft = f" ({spec.draft_model})" if spec.draft_model else ""
    return f" · speculative {spec.method}{draft}, {spec.num_draft_tokens} drafts"


def _run(app: FastAPI, engine: Engine, sock, host: str, port: int, name: str, log_level: str,
         announce: Callable[..., None]) -> None:
    import uvicorn

    # uvicorn answers HTTP on a second thread; this (main) thread, which loaded the model, runs the engine's steps:
    # PyTorch's CPU kernels run about twice as fast here as on a fresh thread (see lmforge/serve/engine.py)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))  # (it leaves signals to us: not main thread)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmforge-http", daemon=True)
    signalled: list[int] = []

    def on_signal(signum: int, frame) -> None:  # finish the current step, then shut down (see below)
        signalled.append(signum)
        engine.request_stop()

    if threading.current_thread() is threading.main_thread():  # SIGTERM and Ctrl-C: the same clean shutdown
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    http.start()
    deadline = time.monotonic() + 60
    while not server.started and http.is_alive() and time.monotonic() < deadline and not signalled:
        time.sleep(0.02)
    if not server.started and not signalled:
        server.should_exit = True
        engine.shutdown()
        raise ServeStartError(f"the HTTP server did not start on {host}:{port} (see the log above)")
    prefix = "on" if engine.enable_prefix_caching else "off"
    exact = engine.dtype == "float32"
    announce(f"lmforge serve: {name} on http://{host}:{port}/v1 · dtype {engine.dtype}"
             f"{' · ' + engine.quantize + ' weights' if engine.quantize else ''} · prefix caching {prefix}"
             f"{_spec_line(engine)}"
             f"{'' if exact else ' · seeded outputs may vary with batching and prefix caching (docs/serving.md)'}",
             flush=True)
    try:
        engine.run_forever(stop=lambda: not http.is_alive() or bool(signalled))
    finally:
        engine.shutdown()  # requests still generating end with finish_reason "abort"; their streams get [DONE]
        server.should_exit = True  # then uvicorn lets open responses finish and closes
        http.join(timeout=15)
    if not signalled:
        raise ServeStartError("the HTTP server stopped unexpectedly (see the log above)")
