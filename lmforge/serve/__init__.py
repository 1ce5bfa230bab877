"""Serving: an engine (KV cache, scheduler, sampling) behind an OpenAI-compatible HTTP API.

* ``engine.Engine`` - model + tokenizer + KV cache; ``Engine.from_folder(path)``; streaming ``generate``.
* ``api.create_app(engine, model_name)`` / ``api.serve(model_dir, host, port)`` - the FastAPI app and uvicorn runner.
* ``smoke.smoke_test(model_dir)`` - the "serve smoke" stage; ``repl.chat_repl(model_dir)`` - a terminal chat.
"""

from lmforge.serve.engine import Engine, GenerationOutput, GenerationResult, PromptTooLongError
from lmforge.serve.sampling import LogitsProcessor, SamplingParams

__all__ = ["Engine", "GenerationOutput", "GenerationResult", "PromptTooLongError", "LogitsProcessor",
           "SamplingParams", "create_app", "serve", "smoke_test", "chat_repl"]


def __getattr__(name):  # the HTTP stack (fastapi, uvicorn, openai) is imported only when asked for
    if name in ("create_app", "serve"):
        from lmforge.serve import api
        return getattr(api, name)
    if name == "smoke_test":
        from lmforge.serve.smoke import smoke_test
        return smoke_test
    if name == "chat_repl":
        from lmforge.serve.repl import chat_repl
        return chat_repl
    raise AttributeError(name)
