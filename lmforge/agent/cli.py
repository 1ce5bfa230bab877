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
    agent = Agent(backend, tools=chosen, system=system, max_steps=max_steps, tool_choice=tool_choice, out_dir=out)
    if out is None:
        result = _print_events(agent, question)
    else:  # a recorded run: manifest + registry row, linked to the model and index it used
        from lmforge.agent.trace import TRACE
        from lmforge.artifacts import StageRun

        config = {"question": question, "model": str(model) if model else None, "base_url": base_url,
                  "model_name": model_name if base_url else None, "tools": names, "system": system,
                  "max_steps": max_steps, "tool_choice": tool_choice, "max_tokens": max_tokens, "temperature": temperature,
                  "tool_timeout": tool_timeout, "allow_dir": str(allow_dir) if allow_dir else None}
        inputs = {k: v for k, v in {"model": model, "index": index}.items() if v is not None}
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
