"""The ``serve_smoke`` stage: serve a model over HTTP, ask it through the official ``openai`` client, record answers.

Its artifact (``answers.json``) links each answer to the model that gave it, so ``lmforge lineage`` can walk from a
served answer back to the raw pages the model was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from lmforge.artifacts import Manifest, write_json
from lmforge.config import StageConfig
from lmforge.progress import console
from lmforge.stages import begin, finished

STAGE = "serve_smoke"
VERSION = "1"


class Config(StageConfig):
    """Start the OpenAI-compatible server on a free loopback port, send one chat and one completion request, stop."""

    model: str = Field(description="Model folder to serve.")
    chat_message: str = Field("Who is the king of Denmark?", description="User message for /v1/chat/completions.")
    completion_prompt: str = Field("To be, or not to be", description="Prompt for /v1/completions.")
    max_tokens: int = Field(32, ge=1, description="Tokens per answer (greedy).")


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    from lmforge.serve.smoke import smoke_test

    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"model": config.model}, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        res = smoke_test(config.model, max_tokens=config.max_tokens, chat_message=config.chat_message,
                         completion_prompt=config.completion_prompt)
        write_json(out / "answers.json", {
            "model": str(Path(config.model).resolve()),
            "chat": {"request": config.chat_message, "answer": res["chat"]},
            "completion": {"request": config.completion_prompt, "answer": res["completion"]},
            "finish_reasons": res["finish_reasons"],
        })
        run_.metrics.update(latency_s=res["latency_s"], tokens_per_s=res["tokens_per_s"],
                            completion_tokens=res["completion_tokens"], port=res["port"])
        console.print(f"  /v1/chat/completions  [dim]{config.chat_message}[/] → {res['chat']!r}")
        console.print(f"  /v1/completions       [dim]{config.completion_prompt}[/] → {res['completion']!r}")
    return finished(out)
