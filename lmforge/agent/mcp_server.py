"""lmforge's own tools as an MCP server (the official ``mcp`` SDK's ``MCPServer``): ``lmforge mcp serve``.

Tools: ``search_knowledge_base`` over a ``lmforge rag`` index, ``ask_knowledge_base`` (a cited answer, with a model),
``generate`` (text from a served model), ``calculator``, ``read_file`` (one allowed folder).  Each is an agent
:class:`FunctionTool` run through ``run_calls``, so a call has the same validation, timeout and error results over MCP
as inside an agent.  Transports: stdio (an MCP client starts the server as a child process) or streamable HTTP on a
socket bound before the tools load (``/mcp``).
"""

from __future__ import annotations

import inspect
import json
import socket
import sys
from typing import Annotated, Any, Iterable

import pydantic
from pydantic_core import to_jsonable_python

from lmforge.agent.tools import Call, FunctionTool, run_calls


def _exposed(t: FunctionTool) -> Any:
    """An async function whose signature is ``t``'s arguments model (types, defaults and the docstring's parameter
    descriptions: the SDK derives the advertised schema from it) and which runs ``t`` through ``run_calls`` on a
    worker thread; an error result becomes the SDK's ``ToolError`` (an ``isError`` result)."""
    import anyio
    from mcp.server.mcpserver.exceptions import ToolError

    async def call(**kwargs: Any) -> Any:
        args = json.dumps(to_jsonable_python(kwargs))
        [res] = await anyio.to_thread.run_sync(run_calls, [Call("mcp", t.name, args)], {t.name: t},
                                               abandon_on_cancel=True)
        if res.error:
            raise ToolError(res.error)
        return res.value

    assert t.args_model is not None, "only tools made from Python functions can be served"
    params = []
    for name, f in t.args_model.model_fields.items():
        ann = Annotated[f.annotation, pydantic.Field(description=f.description)] if f.description else f.annotation
        default = inspect.Parameter.empty if f.is_required() else f.default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    ret = inspect.signature(t.fn).return_annotation
    call.__signature__ = inspect.Signature(params, return_annotation=ret)  # type: ignore[attr-defined]
    call.__name__ = call.__qualname__ = t.name
    call.__doc__ = t.description
    return call


def build_server(tools: Iterable[FunctionTool], name: str = "lmforge", instructions: str | None = None) -> Any:
    """An ``MCPServer`` offering ``tools``."""
    from mcp.server import MCPServer

    server = MCPServer(name, instructions=instructions, log_level="WARNING")
    for t in tools:
        server.add_tool(_exposed(t), name=t.name, description=t.description)
    return server


def lmforge_tools(index: Any = None, allow_dir: Any = None, generator: Any = None, answerer: Any = None,
                  timeout: float = 60.0) -> list[FunctionTool]:
    """The tools ``lmforge mcp serve`` offers: the calculator always; knowledge-base search with ``index`` (a folder or
    ``KnowledgeBase``); ``read_file`` with ``allow_dir``; ``generate`` with a ``generator`` (``lmforge.rag.answer``'s
    ``EngineGenerator`` / ``OpenAIGenerator``); ``ask_knowledge_base`` with an ``Answerer``."""
    from lmforge.agent.builtin import calculator, knowledge_base_tool, read_file_tool

    tools = [FunctionTool.from_function(calculator, timeout=timeout)]
    if index is not None:
        tools.append(knowledge_base_tool(index, timeout=timeout))
    if allow_dir is not None:
        tools.append(read_file_tool(allow_dir, timeout=timeout))
    if generator is not None:
        def generate(prompt: str, max_tokens: int = 256) -> str:
            """Generate a reply to a prompt with the served language model.

            Args:
                prompt: The user message to answer.
                max_tokens: Most tokens to generate (1-2048).
            """
            return "".join(generator.stream([{"role": "user", "content": prompt}], max(1, min(max_tokens, 2048))))

        tools.append(FunctionTool.from_function(generate, timeout=timeout))
    if answerer is not None:
        def ask_knowledge_base(question: str) -> dict:
            """Answer a question from the knowledge base, with numbered citations of its sources; says so when the
            knowledge base has no answer.

            Args:
                question: The question.
            """
            ans = answerer.ask(question)
            return {"answer": ans.answer, "refused": ans.refused,
                    "citations": [{"number": c.number, "path": c.path, "heading": " > ".join(c.heading_path),
                                   "start": c.start, "end": c.end} for c in ans.citations]}

        tools.append(FunctionTool.from_function(ask_knowledge_base, timeout=timeout))
    return tools


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: a free one); ``OSError`` with a clear message when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_http(server: Any, sock: socket.socket) -> None:
    """Serve streamable HTTP at ``/mcp`` on ``sock`` until SIGINT/SIGTERM."""
    import asyncio

    import uvicorn

    host = sock.getsockname()[0]
    app = server.streamable_http_app(host=host)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    asyncio.run(srv.serve(sockets=[sock]))


def serve_stdio(server: Any) -> None:
    server.run("stdio")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/mcp"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
