"""A small MCP server for tests (the official SDK's MCPServer): ``python mcp_test_server.py [http]`` (stdio by
default; ``http`` serves streamable HTTP on a free loopback port and prints its URL on stderr).

Tools: ``add`` (structured result), ``shout`` (text), ``fails`` (an isError result), ``sleepy`` (sleeps), ``die`` (the
process exits mid-call), ``bad.name!`` (a name the OpenAI API does not allow)."""

import os
import sys
import time

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("test-server", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper() + "!"


@server.tool()
def fails(reason: str) -> str:
    """Always fails."""
    raise ToolError(f"refused: {reason}")


@server.tool()
def sleepy(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "awake"


@server.tool()
def die() -> str:
    """Ends the server process in the middle of the call."""
    os._exit(3)


def bad_name() -> str:
    """A tool whose name an OpenAI-style API rejects."""
    return "x"


server.add_tool(bad_name, name="bad name!")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "http":
        from lmforge.agent.mcp_server import bind, log, serve_http, url_of

        sock = bind("127.0.0.1", 0)
        log(f"listening on {url_of(sock)}")
        serve_http(server, sock)
    else:
        server.run("stdio")
