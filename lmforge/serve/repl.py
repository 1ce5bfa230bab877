"""``chat_repl``: a terminal chat with a model folder (history kept, answers streamed)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console

from lmforge.serve.engine import Engine, PromptTooLongError
from lmforge.serve.sampling import SamplingParams

HELP = "Type a message; /reset clears the history, /exit (or Ctrl-D) quits."


def chat_repl(model_dir: str | os.PathLike, *, system: str | None = None, temperature: float = 0.7,
              top_p: float = 0.95, max_tokens: int = 256, seed: int | None = None,
              stdin: TextIO | None = None, console: Console | None = None, engine: Engine | None = None) -> list[dict]:
    """Read user turns from ``stdin`` line by line, stream each answer to the console; returns the history."""
    stdin = stdin or sys.stdin
    console = console or Console(highlight=False, soft_wrap=True)
    engine = engine or Engine.from_folder(model_dir, max_num_seqs=1)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
    console.print(f"[bold]lmforge chat[/bold] · {os.fspath(model_dir)} · {HELP}", markup=True)
    while True:
        if interactive:
            console.print("[bold green]you>[/bold green] ", end="")
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            console.print("[dim](history cleared)[/dim]")
            continue
        history.append({"role": "user", "content": line})
        ids = engine.encode_chat(history)
        room = engine.max_model_len - len(ids)
        if room < 1:
            history.pop()
            console.print("[red]the conversation no longer fits in the context; /reset to start over[/red]")
            continue
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=min(max_tokens, room),
                                stop_token_ids=sorted(engine.chat_stop_token_ids), seed=seed)
        console.print("[bold blue]assistant>[/bold blue] ", end="")
        parts = []
        try:
            for out in engine.generate(ids, params):
                if out.text:
                    parts.append(out.text)
                    console.print(out.text, end="", markup=False)
        except PromptTooLongError as err:
            console.print(f"[red]{err}[/red]")
            history.pop()
            continue
        console.print()
        history.append({"role": "assistant", "content": "".join(parts)})
    return history
