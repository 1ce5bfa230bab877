"""``lmforge agent``: answer a question with tools, printing the steps and streaming the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

BUILTIN = ("calculator", "read_file", "search_knowledge_base")


def agent_cmd(
    question: str = typer.Argument(..., help="The question or task."),
    model: Optional[Path] = typer.Option(None, help="Model folder, served in-process (grammar-constrained calls)."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint (…/v1) instead of --model."),
    model_name: str = typer.Option("default", help="Model name sent to --base-url."),
    api_key: Optional[str] = typer.Option(None, envvar="OPENAI_API_KEY", help="API key for --base-url."),
    tools: str = typer.Option("calculator", help=f"Comma-separated built-in tools: {', '.join(BUILTIN)}."),
    allow_dir: Optional[Path] = typer.Option(None, help="The folder read_file may read (required by read_file)."),
    index: Optional[Path] = typer.Option(None, help="`lmforge rag index` folder (required by "
                                                    "search_knowledge_base)."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_steps: int = typer.Option(6, min=1, help="Most model calls before the loop stops."),
    tool_choice: str = typer.Option("auto", help="auto | first (the first turn must call a tool; helps small "
                                                 "models that answer from memory) | required (every turn)."),
    max_tokens: int = typer.Option(512, min=1, help="Most new tokens per model call."),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature (0 is greedy)."),
    tool_timeout: float = typer.Option(30.0, min=0.001, help="Seconds a tool may run before it is abandoned."),
    max_model_len: int = typer.Option(4096, help="Context cap for --model."),
    out: Optional[Path] = typer.Option(None, help="Folder to write trace.jsonl into."),
    mcp: Optional[list[str]] = typer.Option(None, help="Also use the tools of an MCP server: a URL (streamable "
                                                       "HTTP) or a quoted command line (stdio); repeatable."),
) -> None:
    """Answer QUESTION with a tool-using agent: prints each step (tool calls and results) and streams the answer."""
    from lmforge.agent import Agent, EngineBackend, OpenAIBackend, calculator, knowledge_base_tool, read_file_tool
    from lmforge.agent.tools import FunctionTool

    def fail(msg: str) -> None:
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)

    names = [t.strip() for t in tools.split(",") if t.strip()]
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        fail(f"--tools: unknown tool(s) {', '.join(unknown)} (built-in: {', '.join(BUILTIN)})")
    if bool(model) == bool(base_url):
        fail("give exactly one of --model MODEL_DIR or --base-url URL")
    chosen = []
    try:
        for n in names:
            if n == "calculator":
                chosen.append(FunctionTool.from_function(calculator, timeout=tool_timeout))
            elif n == "read_file":
                if allow_dir is None:
                    fail("--tools read_file needs --allow-dir DIR")
                chosen.append(read_file_tool(allow_dir, timeout=tool_timeout))
            else:
                if index is None:
                    fail("--tools search_knowledge_base needs --index DIR")
                chosen.append(knowledge_base_tool(index, timeout=tool_timeout))
    except (ValueError, OSError) as err:
        fail(str(err))
    if base_url:
        backend = OpenAIBackend(model_name, base_url=base_url, api_key=api_key, temperature=temperature,
                                max_tokens=max_tokens)
    else:
        from lmforge.serve.engine import Engine

        if not (model / "config.json").is_file():
            fail(f"--model {model}: no config.json (not a model folder)")
        backend = EngineBackend(Engine.from_folder(model, max_num_seqs=1, max_model_len=max_model_len),
                                temperature=temperature, max_tokens=max_tokens)
    if tool_choice not in ("auto", "first", "required"):
        fail(f"--tool-choice must be auto, first or required, got {tool_choice!r}")
    import contextlib

    with contextlib.ExitStack() as servers:
        for target in mcp or []:
            from lmforge.agent.mcp_client import MCPError, MCPTools

            try:
                conn = servers.enter_context(MCPTools(target, timeout=tool_timeout))
            except MCPError as err:
                fail(str(err))
            for name, why in conn.skipped.items():
                typer.secho(f"[mcp {conn.label}: tool {name} left out: {why}]", fg="yellow", err=True)
            chosen += conn.tools
        try:
            agent = Agent(backend, tools=chosen, system=system, max_steps=max_steps, tool_choice=tool_choice,
                          out_dir=out)
        except ValueError as err:
            fail(str(err))
        config = {"question": question, "model": str(model) if model else None, "base_url": base_url,
                  "model_name": model_name if base_url else None, "tools": names, "system": system,
                  "max_steps": max_steps, "tool_choice": tool_choice, "max_tokens": max_tokens,
                  "temperature": temperature,
                  "tool_timeout": tool_timeout, "allow_dir": str(allow_dir) if allow_dir else None, "mcp": mcp or []}
        inputs = {k: v for k, v in {"model": model, "index": index}.items() if v is not None}
        run_agent(agent, question, out, config, inputs)


def run_agent(agent, question: str, out: Optional[Path], config: dict, inputs: dict) -> None:
    """Run ``agent`` printing its events; with ``out`` a recorded run (manifest + registry row, linked to
    ``inputs``) whose trace is ``out/trace.jsonl``."""
    if out is None:
        result = _print_events(agent, question)
    else:
        from lmforge.agent.trace import TRACE
        from lmforge.artifacts import StageRun

        (out / TRACE).unlink(missing_ok=True)
        with StageRun("agent", "1", out, config, inputs=inputs) as run:
            result = _print_events(agent, question)
            run.metrics.update(stop_reason=result.stop_reason, steps=result.steps, prompt_tokens=result.prompt_tokens,
                               completion_tokens=result.completion_tokens,
                               tool_calls=sum(r["type"] == "tool" for r in result.trace),
                               tool_errors=sum(r["type"] == "tool" and bool(r["error"]) for r in result.trace))
    if result.stop_reason != "answer":
        typer.echo(result.answer)
    typer.secho(f"[{result.stop_reason}: {result.steps} step(s), {result.prompt_tokens} prompt + "
                f"{result.completion_tokens} completion tokens"
                + (f", trace in {out / 'trace.jsonl'}" if out else "") + "]", fg="cyan", err=True)
    if result.stop_reason == "model_error":
        raise typer.Exit(1)


def _print_events(agent, question: str):
    """Stream the agent's events: the answer on stdout, steps and tool calls on stderr; return the result."""
    result = None
    streaming = False
    for ev in agent.stream(question):
        if ev.type == "step":
            if streaming:
                typer.echo("")
            streaming = False
            typer.secho(f"[step {ev.step}]", fg="cyan", err=True)
        elif ev.type == "delta":
            typer.echo(ev.text, nl=False)
            streaming = True
        elif ev.type == "tool_call":
            if streaming:
                typer.echo("")
                streaming = False
            typer.secho(f"  → {ev.call.name}({ev.call.arguments})", fg="yellow", err=True)
        elif ev.type == "tool_result":
            r = ev.tool_result
            text = r.content if len(r.content) <= 300 else r.content[:300] + "…"
            typer.secho(f"  ← {ev.call.name}: {text}", fg="red" if r.error else "green", err=True)
        elif ev.type == "final":
            result = ev.result
    if streaming:
        typer.echo("")
    return result


def agent_trace_cmd(run: Path = typer.Argument(..., help="An agent run folder (--out of `lmforge agent`) or a "
                                                         "trace.jsonl file.")) -> None:
    """Print an agent run's trace as a tree: model calls (tokens, seconds) and their tool calls (arguments, result,
    error)."""
    from lmforge.agent.trace import format_trace, read_trace

    try:
        records = read_trace(run)
    except (OSError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_trace(records))


def mcp_serve_cmd(
    index: Optional[Path] = typer.Option(None, help="`lmforge rag index` folder: offers search_knowledge_base (and "
                                                    "ask_knowledge_base with a model)."),
    model: Optional[Path] = typer.Option(None, help="Model folder served in-process: offers generate (and "
                                                    "ask_knowledge_base with --index)."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint (…/v1) to generate with instead."),
    model_name: str = typer.Option("default", help="Model name sent to --base-url."),
    allow_dir: Optional[Path] = typer.Option(None, help="Offer read_file over this folder."),
    transport: str = typer.Option("stdio", help="stdio (started by an MCP client) | http (streamable HTTP at /mcp)."),
    host: str = typer.Option("127.0.0.1", help="Address for --transport http."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port for --transport http (0: a free one)."),
    tool_timeout: float = typer.Option(60.0, min=0.001, help="Seconds a tool may run before it is abandoned."),
) -> None:
    """Serve lmforge's tools (knowledge-base search and answers, generation, calculator, read_file) over MCP."""
    import contextlib
    import sys

    from lmforge.agent import mcp_server

    if transport not in ("stdio", "http"):
        typer.echo(f"error: --transport must be stdio or http, got {transport!r}", err=True)
        raise typer.Exit(2)
    if model and base_url:
        typer.echo("error: give at most one of --model and --base-url", err=True)
        raise typer.Exit(2)
    sock = None
    if transport == "http":
        try:
            sock = mcp_server.bind(host, port)
        except OSError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
    # stdout is the protocol channel under stdio: whatever loading prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        try:
            tools = _mcp_tools(index, model, base_url, model_name, allow_dir, tool_timeout)
        except (ValueError, OSError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
    server = mcp_server.build_server(tools, instructions="lmforge tools: " + ", ".join(t.name for t in tools))
    names = ", ".join(t.name for t in tools)
    if sock is not None:
        mcp_server.log(f"MCP server (streamable HTTP) on {mcp_server.url_of(sock)} — tools: {names}")
        mcp_server.serve_http(server, sock)
    else:
        mcp_server.log(f"MCP server on stdio — tools: {names}")
        mcp_server.serve_stdio(server)


def _mcp_tools(index, model, base_url, model_name, allow_dir, timeout):
    from lmforge.agent.mcp_server import lmforge_tools

    generator = answerer = None
    if model is not None:
        if not (model / "config.json").is_file():
            raise ValueError(f"--model {model}: no config.json (not a model folder)")
        from lmforge.rag.answer import EngineGenerator
        from lmforge.serve.engine import Engine

        generator = EngineGenerator(Engine.from_folder(model, max_num_seqs=1))
    elif base_url:
        from lmforge.rag.answer import OpenAIGenerator

        generator = OpenAIGenerator(model_name, base_url=base_url)
    kb = None
    if index is not None:
        from lmforge.rag.index import KnowledgeBase

        kb = KnowledgeBase.load(index)
        if generator is not None:
            from lmforge.rag.answer import Answerer

            answerer = Answerer(kb, generator)
    return lmforge_tools(kb, allow_dir, generator, answerer, timeout=timeout)


def mcp_tools_cmd(server: str = typer.Argument(..., help="An MCP server: a URL (streamable HTTP) or a command line "
                                                         "(stdio), e.g. 'lmforge mcp serve --index kb'."),
                  timeout: float = typer.Option(60.0, help="Seconds to wait for the server.")) -> None:
    """List an MCP server's tools as OpenAI tool declarations (JSON), with the ones an agent cannot use and why."""
    import json

    from lmforge.agent.mcp_client import MCPError, list_tools

    try:
        typer.echo(json.dumps(list_tools(server, timeout=timeout), indent=2, ensure_ascii=False))
    except MCPError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def team_cmd(
    team: Path = typer.Argument(..., help="Team file (YAML): roles, SOPs, message schemas, stop condition."),
    task: str = typer.Argument(..., help="The task or question."),
    model: Optional[Path] = typer.Option(None, help="Model folder, served in-process (messages grammar-constrained)."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint (…/v1) instead of --model."),
    model_name: str = typer.Option("default", help="Model name sent to --base-url."),
    index: Optional[Path] = typer.Option(None, help="`lmforge rag index` folder (for search_knowledge_base)."),
    max_tokens: int = typer.Option(384, min=1, help="Most new tokens per model call."),
    max_model_len: int = typer.Option(4096, help="Context cap for --model."),
    out: Optional[Path] = typer.Option(None, help="Folder for trace.jsonl and log.json (a recorded run)."),
) -> None:
    """Run a role-playing team on TASK: each role's structured messages on a shared log until the stop condition; prints
    the log."""
    import json

    from lmforge.agent import EngineBackend, OpenAIBackend
    from lmforge.agent.team import Team, load_team, team_tools
    from lmforge.config import ConfigError

    def fail(msg: str) -> None:
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)

    if bool(model) == bool(base_url):
        fail("give exactly one of --model MODEL_DIR or --base-url URL")
    try:
        spec = load_team(team)
        tools = team_tools(spec.tool_names(), index)
        unknown = sorted(set(spec.tool_names()) - set(tools))
        if unknown:
            raise ConfigError(f"{team}: unknown tool(s) {', '.join(unknown)} (built-in: calculator, "
                              "search_knowledge_base)")
    except (ConfigError, ValueError, OSError) as err:
        fail(str(err))
    if base_url:
        backend = OpenAIBackend(model_name, base_url=base_url, max_tokens=max_tokens)
    else:
        from lmforge.serve.engine import Engine

        if not (model / "config.json").is_file():
            fail(f"--model {model}: no config.json (not a model folder)")
        backend = EngineBackend(Engine.from_folder(model, max_num_seqs=1, max_model_len=max_model_len),
                                max_tokens=max_tokens)
    try:
        runner = Team(spec, backend, tools, out_dir=out)
    except ValueError as err:
        fail(f"{team}: {err}")

    def show(result) -> None:
        for m in result.log:
            typer.echo(f"[round {m['round']}] {m['role']}: {json.dumps(m['content'], ensure_ascii=False)}")
        typer.secho(f"[{result.stop_reason} after {result.rounds} round(s)"
                    + (f": {result.error}" if result.error else "") + "]", fg="cyan", err=True)

    if out is None:
        result = runner.run(task)
        show(result)
    else:
        from lmforge.agent.trace import TRACE
        from lmforge.artifacts import StageRun

        (out / TRACE).unlink(missing_ok=True)
        config = {"team": str(team), "spec": spec.model_dump(), "task": task, "model": str(model) if model else None,
                  "base_url": base_url, "max_tokens": max_tokens}
        inputs = {k: v for k, v in {"model": model, "index": index}.items() if v is not None}
        with StageRun("team", "1", out, config, inputs=inputs) as run:
            result = runner.run(task)
            (out / "log.json").write_text(json.dumps(result.log, indent=2, ensure_ascii=False))
            run.metrics.update(stop_reason=result.stop_reason, rounds=result.rounds, messages=len(result.log),
                               model_calls=sum(r["type"] == "model" for r in result.trace),
                               tool_calls=sum(r["type"] == "tool" for r in result.trace))
        show(result)
    if result.stop_reason == "role_failed":
        raise typer.Exit(1)


def persona_chat(model: Path, card: Path, *, user: str, prompt: Optional[str], temperature: float, max_tokens: int,
                 max_model_len: int, state_dir: Optional[Path] = None) -> None:
    """`lmforge chat MODEL --persona CARD`: talk to a persona in the terminal (one conversation; the persona's
    memory of USER persists between sessions).  With --prompt or piped stdin only the answers are printed."""
    import sys
    import uuid

    from lmforge.agent import EngineBackend
    from lmforge.agent.persona import load_persona
    from lmforge.config import ConfigError
    from lmforge.serve.engine import Engine

    try:
        persona = load_persona(card, state_dir)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if not (model / "config.json").is_file():
        typer.echo(f"error: {model}: no config.json (not a model folder)", err=True)
        raise typer.Exit(1)
    engine = Engine.from_folder(model, max_num_seqs=1, max_model_len=max_model_len)
    backend = EngineBackend(engine, temperature=temperature, max_tokens=max_tokens)
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is not None:
        messages = iter([prompt])
    elif interactive:
        def ask():
            while True:
                try:
                    yield input("you> ")
                except EOFError:
                    return
        messages = ask()
    else:
        messages = (line.rstrip("\n") for line in sys.stdin)
    history: list[dict] = []
    conversation = uuid.uuid4().hex
    try:
        for text in messages:
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            if interactive:
                typer.echo(f"{persona.name}> ", nl=False)
            for ev in persona.stream(history, backend, user=user, conversation=conversation):
                if ev.type == "delta":
                    typer.echo(ev.text, nl=False)
                elif ev.type == "final":
                    if ev.result.steps == 0 or ev.result.stop_reason != "answer":
                        typer.echo(ev.result.answer, nl=False)
                    history.append({"role": "assistant", "content": ev.result.answer})
            typer.echo("")
    finally:
        engine.shutdown()
