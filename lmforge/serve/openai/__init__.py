"""The OpenAI-compatible HTTP layer, one module per endpoint (vLLM's ``entrypoints/openai`` shape).

- ``common``: error envelope, ``ServerContext`` (engine, model name, limits, hooks), fan-out, SSE, logprobs
- ``guided``: ``response_format`` / ``guided_*`` / ``structured_outputs`` → a grammar spec
- ``chat``, ``completions``, ``embeddings``, ``models``: a serving class and a router each
- ``feedback``: ``POST /v1/feedback`` on answers recorded with ``--record`` (``ServerContext.recorder``)
- ``app``: ``create_app`` assembles them; ``add_chat_hook`` lets other packages (RAG, personas, agents) answer chat
  requests without touching these modules

Request and response models live in ``lmforge.serve.protocol``.
"""

from lmforge.serve.openai.app import add_chat_hook, create_app
from lmforge.serve.openai.common import APIError, ServerContext, error_response

__all__ = ["APIError", "ServerContext", "add_chat_hook", "create_app", "error_response"]
