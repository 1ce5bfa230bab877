"""The merge stage: fold a LoRA adapter folder into its base model's weights, as a recorded run.

``lmforge merge ADAPTER -o OUT`` writes a plain HF model folder (``lora.merge_adapter``) and a manifest whose inputs
are the adapter folder (an ``sft``/``dpo`` run) and the base model, so ``lmforge lineage OUT`` shows
merge → sft → base model and a re-run with the same inputs is skipped as up to date.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field

from lmforge.artifacts import Manifest
from lmforge.config import StageConfig
from lmforge.stages import begin, finished

STAGE = "merge"
VERSION = "1"


class Config(StageConfig):
    """Fold LoRA adapters into the base weights: a plain HF model folder."""

    adapter: str = Field(description="LoRA adapter folder (from `lmforge sft --lora-r R` or `lmforge dpo --lora-r R`).")
    base_model: str | None = Field(None, description="Base model folder; default: the one the adapter records.")


def base_of(config: Config) -> Path:
    """The base model folder: given, or recorded in the adapter folder (``base_model.json``)."""
    from lmforge.align.lora import BASE_FILE

    if config.base_model:
        return Path(config.base_model)
    recorded = Path(config.adapter) / BASE_FILE
    if not recorded.exists():
        raise FileNotFoundError(f"{config.adapter} is not a LoRA adapter folder (no {BASE_FILE}); "
                                "give --base-model or an adapter written by `lmforge sft --lora-r R`")
    return Path(json.loads(recorded.read_text())["base_model"])


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    from lmforge.align.lora import merge_adapter
    from lmforge.model.hf import load_config

    out = Path(out_dir)
    base = base_of(config)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"adapter": config.adapter, "base_model": base},
                 force=force)
    if run_ is None:
        return finished(out)
    with run_:
        merge_adapter(config.adapter, out, base)
        run_.metrics.update({"params": load_config(out).num_params(), "base_model": str(base.resolve())})
    return finished(out)
