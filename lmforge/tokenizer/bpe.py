"""Byte-level BPE training with HF ``tokenizers``, saved as ``tokenizer.json`` + ``tokenizer_config.json``.

The pre-tokenizer is GPT-2's byte-level split (a regex llama.cpp knows as ``gpt-2``), so every input round-trips and
GGUF export can reproduce our tokenization.  The 256 byte symbols are the initial alphabet, so no input is ever
unknown: emoji, CJK and control characters fall back to their UTF-8 bytes.  Special tokens default to ChatML, as
SmolLM2 does: ``<|endoftext|>`` ends a document (bos/eos/pad), ``<|im_start|>`` / ``<|im_end|>`` frame chat turns,
and the chat template renders messages into them; ``SpecialTokens`` changes any of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmforge.artifacts import write_json, write_text

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

# ChatML, the same layout SmolLM2-Instruct uses; a default system prompt is not injected.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template(start: str = IM_START, end: str = IM_END) -> str:
    """The ChatML-style template with ``start`` / ``end`` framing each turn."""
    return CHAT_TEMPLATE.replace(IM_START, start).replace(IM_END, end)


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a tokenizer: ``eos`` ends every document when packing; ``chat_start`` / ``chat_end``
    frame chat turns in the chat template; ``extra`` are further reserved tokens (tool calls, FIM, ...)."""

    bos: str = EOS
    eos: str = EOS
    pad: str = EOS
    chat_start: str = IM_START
    chat_end: str = IM_END
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("bos", "eos", "pad", "chat_start", "chat_end"):
            if not getattr(self, name):
                raise ValueError(f"{name}_token: must not be empty")
        if self.chat_start == self.chat_end:
            raise ValueError(f"chat_start_token and chat_end_token must differ (both {self.chat_start!r})")
        if self.chat_start in (self.eos, self.bos) or self.chat_end in (self.eos, self.bos):
            raise ValueError("chat_start_token / chat_end_token must differ from bos_token and eos_token")

    def all(self) -> list[str]:
        """Every special token once, in id order (eos first, so the default layout gives ``<|endoftext|>`` id 0)."""
        return list(dict.fromkeys([self.eos, self.bos, self.pad, self.chat_start, self.chat_end, *self.extra]))

    def additional(self) -> list[str]:
        return [t for t in self.all() if t not in (self.bos, self.eos, self.pad)]


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, min_frequency: int = 2,
              max_length: int = 2048, length: int | None = None,
              special: SpecialTokens = SpecialTokens()) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` and save ``tokenizer.json`` + ``tokenizer_config.json`` in ``out_dir``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    save_tokenizer(tok, out_dir, max_length=max_length, special=special)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, max_length: int = 2048,
                   special: SpecialTokens = SpecialTokens()) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tokenizer.json", tok.to_str(pretty=False))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in special.all()
    }
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": special.bos,
            "eos_token": special.eos,
            "pad_token": special.pad,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_length,
            "additional_special_tokens": special.additional(),
            "added_tokens_decoder": added,
            "chat_template": chat_template(special.chat_start, special.chat_end),
        },
    )
    write_json(out / "special_tokens_map.json",
               {"bos_token": special.bos, "eos_token": special.eos, "pad_token": special.pad,
                "additional_special_tokens": special.additional()})


def load_tokenizer(folder: str | os.PathLike) -> tuple[Tokenizer, dict]:
    """``(tokenizer, tokenizer_config)`` from a folder holding ``tokenizer.json`` (+ optional ``tokenizer_config.json``)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tok = Tokenizer.from_file(str(path))
    if (folder / "config.json").is_file():
        check_special_tokens(folder, tok, cfg)
    return tok, cfg


def _ids(value: object) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_name(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def check_special_tokens(folder: str | os.PathLike, tok: Tokenizer, tok_cfg: dict) -> None:
    """A model folder whose special tokens disagree is refused with the files and fields named, never served with a
    wrong BOS or a stop token it cannot emit: every bos/eos/pad id of ``config.json`` / ``generation_config.json`` must
    be a token of ``tokenizer.json``; ``tokenizer_config.json``'s bos_token must be ``config.json``'s bos_token_id and
    its eos_token one of the eos ids, where both name them."""
    folder = Path(folder)
    model_cfg = json.loads((folder / "config.json").read_text())
    gen_path = folder / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    size = tok.get_vocab_size(with_added_tokens=True)
    problems: list[str] = []
    for fname, cfg in (("config.json", model_cfg), ("generation_config.json", gen_cfg)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            for i in _ids(cfg.get(key)):
                if not 0 <= i < size:
                    problems.append(f"{fname}: {key} {i} is not a token of tokenizer.json (vocabulary of {size})")
    bos_name = _token_name(tok_cfg.get("bos_token"))
    bos_ids = _ids(model_cfg.get("bos_token_id"))
    if bos_name is not None and bos_ids:
        bos = tok.token_to_id(bos_name)
        if bos is None:
            problems.append(f"tokenizer_config.json: bos_token {bos_name!r} is not in tokenizer.json")
        elif bos not in bos_ids:
            problems.append(f"config.json: bos_token_id {bos_ids[0]} ({tok.id_to_token(bos_ids[0])!r}) disagrees with "
                            f"tokenizer_config.json's bos_token {bos_name!r} (id {bos})")
    eos_name = _token_name(tok_cfg.get("eos_token"))
    eos_ids = _ids(model_cfg.get("eos_token_id")) + _ids(gen_cfg.get("eos_token_id"))
    if eos_name is not None and eos_ids:
        eos = tok.token_to_id(eos_name)
        if eos is None:
            problems.append(f"tokenizer_config.json: eos_token {eos_name!r} is not in tokenizer.json")
        elif eos not in eos_ids:
            problems.append(f"config.json: eos_token_id {eos_ids if len(eos_ids) > 1 else eos_ids[0]} disagrees with "
                            f"tokenizer_config.json's eos_token {eos_name!r} (id {eos})")
    if problems:
        raise ValueError(f"{folder}: special tokens disagree — " + "; ".join(problems)
                         + " (fix the files so that they name the same tokens)")
