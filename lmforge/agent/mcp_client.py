"""Tools of any MCP server (Model Context Protocol, the official ``mcp`` SDK) as agent tools.

    from lmforge.agent import Agent, MCPTools

    with MCPTools("python my_server.py") as server:            # stdio: a command line (str or list)
        agent = Agent(backend, tools=server.tools)
    with MCPTools("http://127.0.0.1:8765/mcp") as server:       # streamable HTTP: a URL
        ...

The SDK is async; the agent loop is not.  One background thread runs an event loop holding the connection (one long
task: the SDK's task groups must be entered and left by the same task); each tool call is handed to it and waited
for.  Every failure comes back as an exception the loop turns into a tool result: an ``isError`` result, a call that
outlives its timeout, a server that dies mid-call (the pending calls fail at once; later calls say the server is
gone).  Tools whose schema constrained decoding cannot enforce, or whose name the OpenAI API does not allow, are left
out and listed in ``skipped`` with the reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shlex
import threading
from typing import Any

from lmforge.agent.tools import FunctionTool
from lmforge.serve.tools import NAME_RE


class MCPError(RuntimeError):
    """The MCP server could not be reached, died, or answered with an error."""


def server_label(target: str | list[str]) -> str:
    return target if isinstance(target, str) else shlex.join(target)


def result_value(result: Any) -> Any:
    """A ``CallToolResult`` as a tool value: its structured content, else its text; ``isError`` raises with the text."""
    texts = []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            texts.append(block.text)
        elif kind == "resource" and hasattr(block.resource, "text"):
            texts.append(block.resource.text)
        else:
            texts.append(f"[{kind} content{', ' + block.mime_type if getattr(block, 'mime_type', None) else ''}]")
    text = "\n".join(texts)
    if result.is_error:
        raise MCPError(text or "the MCP tool reported an error")
    if result.structured_content is not None:
        return result.structured_content
    return text


class MCPTools:
    """A connection to one MCP server and its tools as :class:`FunctionTool`s (``tools``).

    ``target``: a URL (``http(s)://…``: streamable HTTP) or a command line (a string, split like a shell would, or a
    list: the server runs as a child process over stdio).  ``prefix`` is put before every tool name (two servers
    with the same tool names).  ``timeout``: seconds per tool call; ``connect_timeout``: for start-up and listing."""

    def __init__(self, target: str | list[str], *, prefix: str = "", timeout: float = 30.0,
                 connect_timeout: float = 60.0, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.target = target
        self.label = server_label(target)
        self.prefix = prefix
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.env = env
        self.cwd = cwd
        self.tools: list[FunctionTool] = []
        self.skipped: dict[str, str] = {}  # tool name -> why it was left out
        self.server_name = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._gone: str | None = None  # why the connection ended
        self._pending: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------------------------------------
    def _server(self) -> Any:
        from mcp import StdioServerParameters

        target = self.target
        if isinstance(target, str) and target.startswith(("http://", "https://")):
            return target
        argv = shlex.split(target) if isinstance(target, str) else list(target)
        if not argv:
            raise MCPError("an MCP server needs a URL or a command line")
        env = {**os.environ, **(self.env or {})}  # the SDK's default passes only a few variables on
        return StdioServerParameters(command=argv[0], args=argv[1:], env=env, cwd=self.cwd)

    def open(self) -> "MCPTools":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"mcp-{self.label[:40]}", daemon=True)
        self._thread.start()
        try:
            listed = self._ready.result(self.connect_timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise MCPError(f"MCP server {self.label}: no answer within {self.connect_timeout:g} s") from None
        except Exception as err:  # noqa: BLE001 - one clear line, not the SDK's exception group
            self.close()
            raise MCPError(f"MCP server {self.label}: could not connect: {_describe(err)}") from None
        for t in listed:
            self._add(t)
        return self

    def _add(self, t: Any) -> None:
        name = self.prefix + t.name
        if not NAME_RE.match(name):
            self.skipped[t.name] = f"name {name!r} is not 1-64 characters of a-z, A-Z, 0-9, _ . -"
            return
        remote = t.name

        def call(**arguments: Any) -> Any:
            return self.call(remote, arguments)

        try:
            ft = FunctionTool.from_schema(name, t.description or "", dict(t.input_schema or {"type": "object"}),
                                          call, timeout=self.timeout)
        except ValueError as err:
            self.skipped[t.name] = str(err)
            return
        self.tools.append(ft)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # noqa: BLE001 - recorded, reported to every waiting caller
            self._fail(err)

    async def _main(self) -> None:
        import anyio
        from mcp import Client

        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        async with Client(self._server(), read_timeout_seconds=self.connect_timeout) as client:
            info = getattr(client, "server_info", None)
            self.server_name = getattr(info, "name", "") or ""
            tools, cursor = [], None
            while True:
                page = await client.list_tools(cursor=cursor)
                tools += page.tools
                cursor = page.next_cursor
                if not cursor:
                    break
            self._ready.set_result(tools)
            async with anyio.create_task_group() as tg:
                while True:
                    item = await self._queue.get()
                    if item is None:
                        tg.cancel_scope.cancel()
                        break
                    tg.start_soon(self._serve, client, *item)
        self._fail(None)

    async def _serve(self, client: Any, name: str, arguments: dict, fut: concurrent.futures.Future) -> None:
        try:
            res = await client.call_tool(name, arguments, read_timeout_seconds=self.timeout)
        except Exception as err:  # noqa: BLE001 - back to the caller's thread
            if not fut.done():
                fut.set_exception(MCPError(f"MCP server {self.label}: {_describe(err)}"))
            return
        if not fut.done():
            fut.set_result(res)

    def _fail(self, err: BaseException | None) -> None:
        with self._lock:
            self._gone = "closed" if err is None else f"connection lost: {_describe(err)}"
            pending, self._pending = self._pending, set()
        if not self._ready.done():
            self._ready.set_exception(err or MCPError("the connection closed before the tools were listed"))
        for fut in pending:
            if not fut.done():
                fut.set_exception(MCPError(f"MCP server {self.label}: {self._gone}"))

    # -- calls ---------------------------------------------------------------------------------------------------------
    def call(self, name: str, arguments: dict | None = None) -> Any:
        """Call tool ``name`` (its name on the server, without ``prefix``) and wait for its value."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._gone is not None or self._loop is None or self._queue is None:
                raise MCPError(f"MCP server {self.label} is not connected ({self._gone or 'not opened'})")
            self._pending.add(fut)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (name, dict(arguments or {}), fut))
        try:
            return result_value(fut.result(self.timeout + 5))
        except concurrent.futures.TimeoutError:
            raise MCPError(f"MCP server {self.label}: tool '{name}' gave no answer in {self.timeout:g} s") from None
        finally:
            with self._lock:
                self._pending.discard(fut)

    def close(self) -> None:
        loop, queue, thread = self._loop, self._queue, self._thread
        if loop is not None and queue is not None and thread is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:  # the loop already ended
                pass
            thread.join(10)

    def __enter__(self) -> "MCPTools":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _describe(err: BaseException) -> str:
    """One line for an error, unwrapping the exception groups anyio raises."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in err.exceptions)
    text = str(err) or type(err).__name__
    return text if isinstance(err, MCPError) else f"{type(err).__name__}: {text}"


def list_tools(target: str | list[str], timeout: float = 60.0) -> list[dict]:
    """The tools of an MCP server as OpenAI tool declarations (``lmforge mcp tools``)."""
    with MCPTools(target, connect_timeout=timeout) as server:
        return [t.to_openai() for t in server.tools] + [
            {"skipped": name, "reason": why} for name, why in server.skipped.items()]
