"""GGUF files (llama.cpp's format) → our ``LlamaConfig`` + state dict, for every family llama.cpp and we share.

Each tensor is dequantised to float32 with the ``gguf`` package's reference code (``gguf.quants.dequantize``: F32,
F16, BF16, Q4_0 ... Q8_0 and the K-quants Q2_K ... Q6_K, so Q4_K_M / Q5_K_M / Q6_K / Q8_0 files all load) and renamed
from llama.cpp's names to Hugging Face's, undoing what llama.cpp's ``convert_hf_to_gguf.py`` did on the way in:

* ``llama``: q/k rows permuted back from interleaved pairs to rotate-half order;
* ``gemma3``: llama.cpp stores Gemma's norm weights as ``1 + w``; we store ``w``;
* ``phi3``: fused ``attn_qkv`` / ``ffn_up`` (gate and up) are split like HF's fused files.

The config comes from the GGUF metadata (``<arch>.embedding_length`` ...) plus what llama.cpp hard-codes for an
architecture (Gemma 3: a global layer every 6th, local RoPE base 10 000).  The tokenizer is not read here (see
``lmforge.model.pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmforge.model.families import weights_from_hf
from lmforge.model.llama import LlamaConfig

# GGUF general.architecture -> our model_type
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3"}

_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_norm":
                "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


class GGUFError(ValueError):
    pass


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``, with one clear error for a file that is not a complete GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on a bad file
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end} but the file has "
                            f"{size} bytes")
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_architecture(reader, path: str | os.PathLike = "") -> str:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})")
    return arch


def config_from_gguf(reader, path: str | os.PathLike = "") -> LlamaConfig:
    arch = gguf_architecture(reader, path)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported")

    def meta(key, default=None):
        return field(reader, f"{arch}.{key}", default)

    hidden, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    layers = int(meta("block_count"))
    head_dim = int(meta("attention.key_length", hidden // n_head))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    scaling = None
    kind = meta("rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": float(meta("rope.scaling.factor", 1.0))}
    kw = dict(
        model_type=GGUF_ARCHITECTURES[arch], vocab_size=int(embd.shape[1]), hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")), num_hidden_layers=layers, num_attention_heads=n_head,
        num_key_value_heads=int(meta("attention.head_count_kv", n_head)), head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10_000.0)), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
        qkv_bias=arch == "qwen2" and "blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=meta("attention.sliding_window"))
    if arch == "gemma3":  # what llama.cpp hard-codes for Gemma 3
        pattern = meta("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # newer files: one flag per layer
            types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(layers)]
        kw.update(gemma_norms=True, hidden_act="gelu_pytorch_tanh", layer_types=types, rope_local_theta=10_000.0,
                  query_pre_attn_scalar=float(hidden // n_head if layers == 62 else head_dim),  # 27B: hidden/heads
                  final_logit_softcapping=meta("final_logit_softcapping"))
    elif arch == "llama":
        kw["sliding_window"] = None
    return LlamaConfig(**kw)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved-pair rows → HF's rotate-half order (inverse of ``permute_for_llama_cpp``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t) -> torch.Tensor:
    """One GGUF tensor as float32, in PyTorch's [rows, cols] order, via ``gguf``'s reference dequantiser."""
    import gguf

    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32, order="C"))  # a writable copy


def state_dict_from_gguf(reader, cfg: LlamaConfig, path: str | os.PathLike = "") -> dict[str, torch.Tensor]:
    arch = gguf_architecture(reader, path)
    layer_names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if arch == "phi3":
        layer_names = {**layer_names, "ffn_up": "mlp.gate_up_proj"}  # gate and up fused, gate first
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        base, kind = t.name.rsplit(".", 1)
        if base in top:
            name = f"{top[base]}.{kind}"
        else:
            parts = base.split(".")
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in layer_names:
                raise GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}")
            name = f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
        w = dequantize(t)
        if arch == "llama" and parts_is(t.name, "attn_q"):
            w = _unpermute(w, cfg.num_attention_heads)
        elif arch == "llama" and parts_is(t.name, "attn_k"):
            w = _unpermute(w, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0
        sd[name] = w
    return weights_from_hf(cfg, sd)


def parts_is(tensor_name: str, short: str) -> bool:
    return tensor_name.startswith("blk.") and tensor_name.split(".")[2] == short


def load_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """``(config, state dict with HF names, float32)`` of a GGUF model file."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    return cfg, state_dict_from_gguf(reader, cfg, path)


def load_gguf_model(path: str | os.PathLike):
    """A ``Llama`` (float32, eval mode) with the weights of a GGUF file."""
    from lmforge.model.llama import Llama

    cfg, sd = load_gguf(path)
    model = Llama(cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFError(f"{path}: tensors do not match the metadata (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    return model.eval()
