"""LoRA adapters on our ``Llama`` via ``peft``, adapter-only folders, and ``merge`` back into a plain model folder.

``add_lora`` wraps a model with low-rank adapters on the linear layers named in ``targets`` (suffixes of parameter
names as in Hugging Face: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``);
the base weights are frozen.  An adapter folder holds what ``peft`` writes (``adapter_config.json`` +
``adapter_model.safetensors``) and ``base_model.json`` naming the model folder it was trained on.  ``merge_adapter``
folds ``W + (alpha/r) B A`` into the base weights and writes an ordinary HF model folder (plus tokenizer files).

QLoRA (a 4-bit quantised frozen base) needs ``bitsandbytes`` kernels, which exist for CUDA GPUs only; on a CPU the
base stays in float32 (or bfloat16) and only the memory for gradients and optimizer state is saved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lmforge.artifacts import write_json
from lmforge.model.hf import load_model, save_model
from lmforge.model.llama import Llama

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BASE_FILE = "base_model.json"

FULL_HELP = "Full fine-tuning: every weight trains, a model folder is written (the default without --lora-r)."
LORA_R_HELP = "LoRA rank R >= 1: train low-rank adapters over the frozen base, an adapter folder is written."


def check_lora_rank(lora_r: int | None, full: bool | None) -> int | None:
    """The fine-tuning mode is explicit: ``full`` or a LoRA rank ``lora_r >= 1``, never both, never rank 0.

    For a config's ``lora_r`` field validator (``full`` is validated first)."""
    if lora_r is None:
        if full is False:
            raise ValueError("full: false needs a LoRA rank: give lora_r (--lora-r R, R >= 1) or full: true (--full)")
        return None
    if lora_r < 1:
        raise ValueError(f"{lora_r} is not a LoRA rank (R >= 1); for full fine-tuning give full: true (--full) "
                         "and no lora_r")
    if full:
        raise ValueError("give either full: true (--full) or lora_r (--lora-r R), not both")
    return lora_r


def mode_line(full: bool | None, lora_r: int | None) -> str:
    """How a run fine-tunes, said at its start."""
    if lora_r:
        return f"LoRA r={lora_r} (adapters over a frozen base; --full trains every weight instead)"
    if full:
        return "full fine-tuning (--full)"
    return "full fine-tuning (the default when no --lora-r is given; --lora-r R trains LoRA adapters instead)"


def add_lora(model: Llama, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: list[str] | None = None) -> nn.Module:
    """``model`` wrapped in a ``peft.PeftModel`` with LoRA on ``targets``; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    targets = targets or DEFAULT_TARGETS
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} name no linear layer of the model (it has {sorted(names)})")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, cfg)


def trainable_share(model: nn.Module) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}


def save_adapter(peft_model: nn.Module, folder: str | os.PathLike, base_model: str | os.PathLike) -> None:
    """Write the adapter weights and config (no base weights) and the base model's path."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    write_json(folder / BASE_FILE, {"base_model": str(Path(base_model).resolve())})


def load_adapter(folder: str | os.PathLike, base_model: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model (from ``base_model`` or the path recorded in the adapter folder) with the adapter applied."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
    base = Path(base_model) if base_model else Path(json.loads((folder / BASE_FILE).read_text())["base_model"])
    model = load_model(base, dtype=dtype)
    return PeftModel.from_pretrained(model, str(folder)).eval()


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike,
                  base_model: str | os.PathLike | None = None) -> Path:
    """Fold the adapter into the base weights; write a plain HF model folder with the base's tokenizer files."""
    adapter = Path(adapter)
    base = Path(base_model) if base_model else Path(json.loads((adapter / BASE_FILE).read_text())["base_model"])
    merged: Llama = load_adapter(adapter, base).merge_and_unload()
    out = Path(out)
    save_model(merged, out)
    for name in TOKENIZER_FILES:
        src = adapter / name if (adapter / name).exists() else base / name
        if src.exists():
            shutil.copy(src, out / name)
    return out
