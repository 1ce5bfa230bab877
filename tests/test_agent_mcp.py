"""MCP through the official SDK: the agent uses the tools of a real MCP server process (stdio and streamable HTTP) —
listing, calls, an isError result, bad arguments, a timeout, a server that dies mid-call — and `lmforge mcp serve`
offers lmforge's tools (knowledge-base search over a real index, read_file, calculator, generate) to MCP clients."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from agent_fakes import fake_openai_server

pytest.importorskip("mcp")

from lmforge.agent import Agent, MCPError, MCPTools, ScriptedModel  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEST_SERVER = [sys.executable, str(HERE / "mcp_test_server.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def cli(*args: str):
    """Run the lmforge CLI in process (typer's runner, stdout and stderr apart)."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    return CliRunner().invoke(app, list(args))


@contextmanager
def http_server(argv: list[str], timeout: float = 180) -> Iterator[str]:
    """Start an MCP server process that prints its URL on stderr; yield the URL; stop it (SIGTERM)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        deadline, seen = time.monotonic() + timeout, []
        while True:
            line = proc.stderr.readline()
            seen.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/mcp)", line)
            if m:
                break
            assert line and time.monotonic() < deadline, f"the server did not start: {''.join(seen)[-2000:]}"
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_agent_lists_and_calls_the_tools_of_a_stdio_server():
    with MCPTools(TEST_SERVER, timeout=2) as server:
        assert server.server_name == "test-server"
        names = {t.name for t in server.tools}
        assert names == {"add", "shout", "fails", "sleepy", "die"}
        assert "bad name!" in server.skipped and "a-z" in server.skipped["bad name!"]
        add = next(t for t in server.tools if t.name == "add")
        assert add.parameters["properties"]["a"]["type"] == "integer" and add.description == "Add two integers."
        model = ScriptedModel([
            [("add", {"a": 2, "b": 40}), ("shout", {"text": "hi"})],  # parallel calls
            [("fails", {"reason": "no stock"}), ("add", {"a": "two"}), ("nope", {})],
            [("sleepy", {"seconds": 30})],
            "The sum is 42.",
        ])
        result = Agent(model, tools=server.tools, max_steps=5).run("Add 2 and 40.")
    assert result.stop_reason == "answer" and result.answer == "The sum is 42."
    assert [t["function"]["name"] for t in model.tools_seen[0]] == [t.name for t in server.tools]
    tools = [r for r in result.trace if r["type"] == "tool"]
    assert json.loads(tools[0]["result"]) == {"result": 42} and json.loads(tools[1]["result"]) == {"result": "HI!"}
    assert "refused: no stock" in tools[2]["error"]
    assert "field 'a'" in tools[3]["error"] and "field '(arguments)'" in tools[3]["error"]  # validated before sending
    assert "unknown tool 'nope'" in tools[4]["error"]
    assert "timed out after 2 s" in tools[5]["error"]
    # every tool result reached the model as a tool message
    assert sum(m["role"] == "tool" for m in model.requests[-1]) == 6


def test_a_server_that_dies_mid_call_gives_error_results_not_a_hang():
    with MCPTools(TEST_SERVER, timeout=20) as server:
        model = ScriptedModel([[("die", {})], [("add", {"a": 1, "b": 1})], "Sorry, the tool server is down."])
        start = time.monotonic()
        result = Agent(model, tools=server.tools, max_steps=4).run("Go.")
        elapsed = time.monotonic() - start
    errors = [r["error"] for r in result.trace if r["type"] == "tool"]
    assert result.stop_reason == "answer" and len(errors) == 2
    assert "Connection closed" in errors[0] or "connection lost" in errors[0]
    assert errors[1] and "MCP server" in errors[1]
    assert elapsed < 15  # the pending call failed when the pipe closed, not at its 20 s timeout


def test_connect_failures_are_one_clear_error():
    with pytest.raises(MCPError, match="could not connect"):
        MCPTools([sys.executable, "-c", "import sys; sys.exit(5)"], connect_timeout=30).open()
    with pytest.raises(MCPError, match="could not connect"):
        MCPTools("http://127.0.0.1:9/mcp", connect_timeout=30).open()  # nothing listens on the discard port


def test_agent_cli_uses_a_streamable_http_server(tmp_path):
    """`lmforge agent --mcp URL` over an OpenAI endpoint: the model sees the server's tools and gets their results."""
    script = [[("add", {"a": 20, "b": 22})], "It is 42."]
    with http_server(TEST_SERVER + ["http"]) as url, fake_openai_server(script) as (base_url, requests):
        res = cli("agent", "What is 20 + 22?", "--base-url", base_url, "--tools", "", "--mcp", url,
                  "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == "It is 42."
    assert "left out" in res.stderr and "bad name!" in res.stderr
    assert "add" in {t["function"]["name"] for t in requests[0]["tools"]}
    assert requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_1_0", "content": '{"result": 42}'}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["mcp"] == [url]


def test_lmforge_mcp_serve_over_stdio_offers_read_file_and_calculator(tmp_path):
    (tmp_path / "notes.txt").write_text("The vault code is 4711.\n")
    cmd = [sys.executable, "-m", "lmforge.cli", "mcp", "serve", "--allow-dir", str(tmp_path)]
    with MCPTools(cmd, env={"PYTHONPATH": str(REPO)}, timeout=30) as server:
        assert server.server_name == "lmforge" and {t.name for t in server.tools} == {"calculator", "read_file"}
        read = next(t for t in server.tools if t.name == "read_file")
        assert read.parameters["properties"]["path"]["description"].startswith("The file's path")
        assert server.call("read_file", {"path": "notes.txt"}) == {"result": "The vault code is 4711.\n"}
        assert server.call("calculator", {"expression": "17 * 23"}) == {"result": 391}
        with pytest.raises(MCPError, match="outside the allowed folder"):
            server.call("read_file", {"path": "../../etc/passwd"})
        with pytest.raises(MCPError, match="unsupported expression"):
            server.call("calculator", {"expression": "__import__('os')"})


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory) -> Path:
    """A real `lmforge rag index` (MiniLM) over two small policy pages."""
    from lmforge.rag.stage import Config, build_index

    root = tmp_path_factory.mktemp("mcpkb")
    docs = root / "docs"
    docs.mkdir()
    (docs / "returns.md").write_text("# Policies\n\n## Returns\n\nItems can be returned within 30 days of delivery "
                                     "for a full refund.\n")
    (docs / "shipping.md").write_text("# Policies\n\n## Shipping\n\nOrders ship from Lyon within two working days.\n")
    build_index(Config(docs=str(docs), chunk_tokens=64, overlap_tokens=8), root / "idx")
    return root / "idx"


def test_lmforge_mcp_serve_over_http_searches_the_index_and_generates(minilm_index, tmp_path):
    script = ["Lyon is in France.", "Items can be returned within 30 days of delivery for a full refund [1]."]
    with fake_openai_server(script) as (base_url, requests):
        cmd = [sys.executable, "-m", "lmforge.cli", "mcp", "serve", "--index", str(minilm_index), "--base-url",
               base_url, "--transport", "http", "--port", "0"]
        with http_server(cmd) as url:
            listed = cli("mcp", "tools", url)
            with MCPTools(url, timeout=60) as server:
                [hit, *_] = server.call("search_knowledge_base", {"query": "how long do I have to return an item",
                                                                  "k": 1})["result"]
                generated = server.call("generate", {"prompt": "Where is Lyon?", "max_tokens": 20})
                question = {"question": "How long do I have to return an item?"}
                answered = server.call("ask_knowledge_base", question)["result"]
    assert listed.exit_code == 0, listed.stderr
    names = [t["function"]["name"] for t in json.loads(listed.stdout)]
    assert names == ["calculator", "search_knowledge_base", "generate", "ask_knowledge_base"]
    assert hit["path"] == "returns.md" and "30 days" in hit["text"] and hit["heading"].endswith("Returns")
    assert generated == {"result": "Lyon is in France. "}
    assert requests[0]["messages"] == [{"role": "user", "content": "Where is Lyon?"}]
    assert answered["refused"] is False and "30 days" in answered["answer"]
    assert [c["path"] for c in answered["citations"]] == ["returns.md"]
    shown = " ".join(m["content"] for m in requests[1]["messages"])
    assert "within 30 days of delivery" in shown  # the retrieved source was given to the model


def test_lmforge_mcp_serve_bad_input_is_one_line(tmp_path):
    missing = cli("mcp", "serve", "--index", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "no knowledge base here" in missing.stderr and missing.exception is not None
    assert isinstance(missing.exception, SystemExit)  # typer.Exit, not a traceback
    bad = cli("mcp", "serve", "--transport", "carrier-pigeon")
    assert bad.exit_code == 2 and "--transport must be stdio or http" in bad.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        taken = cli("mcp", "serve", "--transport", "http", "--port", str(held.getsockname()[1]))
    assert taken.exit_code == 1 and "cannot listen on 127.0.0.1" in taken.stderr
    listed = cli("mcp", "tools", f"{sys.executable} -c pass")
    assert listed.exit_code == 1 and listed.stderr.startswith("error: MCP server") and "could not connect" in listed.stderr
    unreachable = cli("agent", "hi", "--base-url", "http://127.0.0.1:9/v1", "--mcp", f"{sys.executable} -c pass")
    assert unreachable.exit_code == 2 and "could not connect" in unreachable.stderr
