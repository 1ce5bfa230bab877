"""``export_hf``: a self-contained HF folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with the chat template, special_tokens_map.json, generation_config.json) that ``transformers`` and vLLM load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lmforge.artifacts import write_json
from lmforge.model.hf import load_model, save_model
from lmforge.tokenizer.bpe import CHAT_TEMPLATE

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write ``model_dir`` as an HF folder in ``dtype`` (float32 / bfloat16 / float16) to ``out_dir``."""
    src, out = Path(model_dir), Path(out_dir)
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(HF_DTYPES)}, got {dtype!r}")
    if not (src / "tokenizer.json").exists():
        raise FileNotFoundError(f"{src} has no tokenizer.json: export needs a model folder with its tokenizer")
    if out.resolve() == src.resolve():
        raise ValueError("the export folder must differ from the model folder")
    model = load_model(src)
    save_model(model, out, dtype=HF_DTYPES[dtype])
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    tok_cfg_path = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    if not tok_cfg.get("chat_template") and (src / "chat_template.jinja").exists():
        tok_cfg["chat_template"] = (src / "chat_template.jinja").read_text()
    tok_cfg.setdefault("chat_template", CHAT_TEMPLATE)
    tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    write_json(out / "tokenizer_config.json", tok_cfg)
    if (src / "special_tokens_map.json").exists():
        shutil.copyfile(src / "special_tokens_map.json", out / "special_tokens_map.json")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# as a recorded run: ``lmforge export hf`` (so ``lmforge lineage OUT`` leads back to the model it exported)

STAGE = "export_hf"
VERSION = "1"


def run(model_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32", force: bool = False):
    """``export_hf`` inside a ``StageRun`` with the model folder as its input; skipped when up to date."""
    from lmforge.stages import begin, finished

    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise ValueError("the export folder must differ from the model folder")
    run_ = begin(STAGE, VERSION, out_dir, {"dtype": dtype}, inputs={"model": model_dir}, force=force)
    if run_ is None:
        return finished(out_dir)
    with run_:
        export_hf(model_dir, out_dir, dtype)
        run_.metrics["dtype"] = dtype
    return finished(out_dir)
