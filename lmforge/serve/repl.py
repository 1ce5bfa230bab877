"""``chat_repl``: a terminal chat with a model folder (history kept, answers streamed)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console
from rich.markup import escape

from lmforge.serve.engine import Engine, PromptTooLongError
from lmforge.serve.sampling import SamplingParams

HELP = "Type a message; /reset clears the history, /exit (or Ctrl-D) quits."


def chat_repl(model_dir: str | os.PathLike, *, system: str | None = None, temperature: float = 0.7,
              top_p: float = 0.95, max_tokens: int = 256, seed: int | None = None, dtype: str = "float32",
              quantize: str | None = None, max_model_len: int | None = 2048, prompt: str | None = None,
              stdin: TextIO | None = None, console: Console | None = None, engine: Engine | None = None) -> list[dict]:
    """Read user turns from ``stdin`` line by line, stream each answer to the console; returns the history.

    With ``prompt``, answer that one message and return.  With ``prompt`` or a ``stdin`` that is not a terminal,
    only the answers are printed (one per line, no banner or prompts), so the output can be piped."""
    stdin = stdin or sys.stdin
    console = console or Console(highlight=False, soft_wrap=True, emoji=False)
    if engine is None:
        from lmforge.serve.api import load_engine  # a missing or unreadable folder: ServeStartError, one line

        engine = load_engine(model_dir, max_num_seqs=1, dtype=dtype, quantize=quantize, max_model_len=max_model_len)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = prompt is None and (stdin.isatty() if hasattr(stdin, "isatty") else False)
    if interactive:
        console.print(f"[bold]lmforge chat[/bold] · {os.fspath(model_dir)} · dtype {engine.dtype} · {HELP}",
                      markup=True)
    errors = console if interactive or console.stderr else Console(stderr=True, highlight=False)

    def turns():
        if prompt is not None:
            yield prompt
            return
        while True:
            if interactive:
                console.print("[bold green]you>[/bold green] ", end="")
            line = stdin.readline()
            if not line:
                return
            yield line

    for line in turns():
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
            errors.print("[red]the conversation no longer fits in the context; /reset to start over[/red]")
            continue
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=min(max_tokens, room),
                                stop_token_ids=sorted(engine.chat_stop_token_ids), seed=seed)
        if interactive:
            console.print("[bold blue]assistant>[/bold blue] ", end="")
        parts = []
        try:
            for out in engine.generate(ids, params):
                if out.text:
                    parts.append(out.text)
                    console.file.write(out.text)  # verbatim (console.print would expand tabs, parse emoji codes)
                    console.file.flush()
        except PromptTooLongError as err:
            errors.print(f"[red]{escape(str(err))}[/red]")
            history.pop()
            continue
        console.file.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})
    return history
