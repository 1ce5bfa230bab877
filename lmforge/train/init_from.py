"""Continued pretraining: start from an existing Hugging Face Llama model folder instead of random weights.

The folder may be ours, one written by ``transformers``' ``save_pretrained`` or ``materialize_smollm2()``.  Its
``config.json`` fixes the model's shape; the tokenizer artifact that packed the training tokens must be the model's
own tokenizer (same vocabulary, token for token), otherwise every token id would mean something else.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.model.hf import load_config, load_state_dict
from lmforge.model.llama import Llama, LlamaConfig


def _vocab(folder: Path) -> dict[str, int] | None:
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def check_init_folder(folder: str | os.PathLike, tokenizer_dir: str | os.PathLike, vocab_size: int,
                      seq_len: int) -> LlamaConfig:
    """The model config of ``folder``, after checking it fits the tokenizer artifact and ``seq_len``."""
    folder, tokenizer_dir = Path(folder), Path(tokenizer_dir)
    if not (folder / "config.json").exists():
        raise ConfigError(f"init_from: {folder} is not a model folder (no config.json)")
    try:  # LlamaConfig.from_hf_dict reads rope_theta from rope_parameters too, and refuses rope scaling
        cfg = load_config(folder)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        where = "" if str(err).startswith(str(folder)) else f"{folder}/config.json: "  # said once, not twice
        raise ConfigError(f"init_from: {where}{err}") from None
    if vocab_size > cfg.vocab_size:
        raise ConfigError(f"init_from: the tokenizer {tokenizer_dir} has {vocab_size} tokens but the model in "
                          f"{folder} only {cfg.vocab_size} embeddings")
    theirs, ours = _vocab(folder), _vocab(tokenizer_dir)
    if theirs is None:
        if vocab_size != cfg.vocab_size:
            raise ConfigError(f"init_from: {folder} has no tokenizer.json to compare with and its vocab_size "
                              f"{cfg.vocab_size} differs from the tokenizer's {vocab_size}")
    elif theirs != ours:
        differ = sorted(set(theirs.items()) ^ set((ours or {}).items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(f"init_from: the tokenizer {tokenizer_dir} is not the model's own ({folder}/tokenizer.json): "
                          f"{len(theirs)} vs {len(ours or {})} tokens, first differences {differ}; pack the training "
                          f"data with the model's tokenizer")
    if seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"seq_len: {seq_len} exceeds the context length {cfg.max_position_embeddings} of the "
                          f"model in {folder}")
    return cfg


def load_initial_model(folder: str | os.PathLike, tokenizer_dir: str | os.PathLike, vocab_size: int,
                       seq_len: int) -> Llama:
    """The float32 model of ``folder`` in training mode, checked against the tokenizer artifact."""
    cfg = check_init_folder(folder, tokenizer_dir, vocab_size, seq_len)
    model = Llama(cfg)
    sd = {k: v.float() for k, v in load_state_dict(folder).items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"init_from: {folder}: weights do not match its config.json (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.train()
