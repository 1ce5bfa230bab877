"""Checkpoints: model weights (safetensors), optimizer state, RNG states and the data cursor, written atomically.

Layout: ``checkpoints/step-000200/{model.safetensors, optimizer.pt, state.json}``.  A checkpoint folder is written
under a temporary name and renamed, so a run killed mid-write leaves the previous checkpoint intact.  Only the newest
``keep`` checkpoints are kept.

The files hold *unsharded* tensors whatever the parallelism (``distributed.full_state_dicts``): the weights in the
Hugging Face layout, the optimizer state keyed by parameter name.  So a checkpoint written by one process resumes
under DDP or FSDP and the other way round.  Under FSDP saving is a collective (every rank calls ``save_checkpoint``,
rank 0 writes) and every rank reads the files when resuming.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.model.llama import Llama
from lmforge.train.distributed import World, full_state_dicts, load_full_state_dicts


def save_checkpoint(folder: str | os.PathLike, step: int, model: Llama, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2, world: World = World()) -> Path | None:
    """Write checkpoint ``step`` (rank 0; every rank must call it); returns its folder (``None`` on other ranks)."""
    model_sd, optim_sd = full_state_dicts(model, optimizer)
    if not world.is_main:
        return None
    if model.config.tie_word_embeddings:
        model_sd.pop("lm_head.weight", None)  # tied: HF stores only the embedding
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
    torch.save(optim_sd, tmp / "optimizer.pt")
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
    """Restore weights, optimizer state and the RNG from ``path`` into a plain or sharded model (every rank calls
    it)."""
    path = Path(path)
    sd = load_file(str(path / "model.safetensors"))
    if model.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    optim_sd = torch.load(path / "optimizer.pt", weights_only=True)
    if any(isinstance(k, int) for k in optim_sd["state"]):  # written by plain ``optimizer.state_dict()`` (before FSDP)
        model.load_state_dict(sd)
        optimizer.load_state_dict(optim_sd)
    else:
        load_full_state_dicts(model, optimizer, sd, optim_sd)
    state = json.loads((path / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state.pop("rng_torch"), dtype=torch.uint8))
    return state
