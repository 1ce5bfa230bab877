"""Checkpoints: model weights (safetensors), optimizer state, RNG states and the data cursor, written atomically.

Layout: ``checkpoints/step-000200/{model.safetensors, optimizer.pt, state.json}``.  A checkpoint folder is written
under a temporary name and renamed, so a run killed mid-write leaves the previous checkpoint intact.  Only the newest
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.model.hf import state_dict_for_save
from lmforge.model.llama import Llama


def save_checkpoint(folder: str | os.PathLike, step: int, model: Llama, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state, "rng_torch": torch.get_rng_state().tolist()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    root = Path(folder)
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, model: Llama, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    path = Path(path)
    sd = load_file(str(path / "model.safetensors"))
    model.load_state_dict(sd, strict=not model.config.tie_word_embeddings)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state.pop("rng_torch"), dtype=torch.uint8))
    return state
