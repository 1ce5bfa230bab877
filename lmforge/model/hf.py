"""Hugging Face-layout model folders: ``config.json`` + ``model.safetensors`` + ``generation_config.json``.

``save_model`` writes what ``transformers.AutoModelForCausalLM.from_pretrained`` reads; ``load_model`` reads such a
folder (ours or one saved by ``transformers``, single file or sharded) of any family in
``lmforge.model.families.SUPPORTED`` (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3, Phi-3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.artifacts import atomic_path, write_json
from lmforge.model.families import weights_from_hf, weights_to_hf
from lmforge.model.llama import Llama, LlamaConfig


def state_dict_for_save(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors under the family's HF names (Phi-3: fused projections)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: HF stores only the embedding
    return {k: v.contiguous() for k, v in weights_to_hf(model.config, sd).items()}


def save_model(model: Llama, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(folder / "config.json", cfg)
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None:
            gen[key] = cfg[key]
    write_json(folder / "generation_config.json", gen)
    tensors = {k: v.to(dtype) for k, v in state_dict_for_save(model).items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_config(folder: str | os.PathLike) -> LlamaConfig:
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)") from None
    try:
        return LlamaConfig.from_hf_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(folder / shard)))
        return sd
    raise FileNotFoundError(f"{folder} has no model.safetensors")


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Llama:
    cfg = load_config(folder)
    model = Llama(cfg)
    sd = weights_from_hf(cfg, load_state_dict(folder))
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device=device, dtype=dtype).eval()
