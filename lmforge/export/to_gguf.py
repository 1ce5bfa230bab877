"""``export_gguf``: a GGUF for llama.cpp, written with the ``gguf`` package, for every family llama.cpp has.

* metadata: architecture ``llama`` (Llama; Mistral without a window), ``qwen2``, ``qwen3``, ``gemma3``, ``phi3``;
  context / embedding / feed-forward lengths, heads, kv-heads, RoPE base, RMS eps (+ sliding window);
* tokenizer: byte-level BPE as ``gpt2`` with pre-tokenizer ``gpt-2`` (the split our tokenizers use), the vocabulary,
  token types (special tokens are CONTROL), merges, bos / eos / pad / unk ids and the chat template;
* tensors under llama.cpp's names; for ``llama`` the ``q_proj`` / ``k_proj`` rows are permuted the way llama.cpp's
  converter does (llama.cpp's ``llama`` applies RoPE to interleaved pairs, HF to halves: without the permutation the
  file loads and gives wrong logits; the other architectures use rotate-half there too); Gemma norms stored as
  ``1 + w``; Phi-3's q/k/v and gate/up fused (``attn_qkv``, ``ffn_up``), as llama.cpp's converter writes them;
* ``--dtype`` f32 / f16 / q8_0 / q4_0 for the 2-D weights (``gguf``'s own quantisers); norms stay f32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.artifacts import atomic_path
from lmforge.model.hf import load_model
from lmforge.model.llama import LlamaConfig

GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order → llama.cpp's interleaved pairs (what ``convert_hf_to_gguf.py`` does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_architecture(cfg: LlamaConfig) -> str:
    """llama.cpp's architecture name for ``cfg``, or a clear error where llama.cpp would compute something else."""
    mt = cfg.model_type
    if mt in ("llama", "mistral"):
        if "sliding_attention" in cfg.layer_types and cfg.sliding_window < cfg.max_position_embeddings:
            raise ValueError(f"{mt} with a sliding window ({cfg.sliding_window}) cannot be exported: llama.cpp's "
                             "'llama' architecture attends to the whole context")
        return "llama"
    if mt == "gemma3_text":
        standard = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                    for i in range(cfg.num_hidden_layers)]
        if cfg.layer_types != standard or (cfg.query_pre_attn_scalar or cfg.head_dim) != cfg.head_dim \
                or cfg.final_logit_softcapping or cfg.rope_local_theta != 10_000.0:
            raise ValueError("this Gemma 3 config differs from what llama.cpp hard-codes (a global layer every 6th, "
                             "attention scale 1/sqrt(head_dim), local RoPE base 10000, no soft-capping)")
        return "gemma3"
    if mt in ("qwen2", "qwen3") and "sliding_attention" in cfg.layer_types:
        raise ValueError(f"{mt} with sliding-window layers cannot be exported: llama.cpp's {mt} has no window")
    if mt == "phi3" and "sliding_attention" in cfg.layer_types and cfg.sliding_window < cfg.max_position_embeddings:
        raise ValueError(f"phi3 with a sliding window ({cfg.sliding_window}) shorter than its context "
                         f"({cfg.max_position_embeddings}) cannot be exported: llama.cpp disables Phi-3's sliding "
                         "window and attends to the whole context, so its logits differ past the window")
    if mt in ("qwen2", "qwen3", "phi3"):
        return mt
    raise ValueError(f"model_type {mt!r} has no GGUF export")


def tensor_map(cfg: LlamaConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (HF) parameter names → llama.cpp names, with q/k permuted (``llama``), Gemma norms as ``1 + w`` and
    Phi-3's projections fused."""
    arch = gguf_architecture(cfg)
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch == "gemma3":
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    if arch == "phi3":
        names.update({"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"})
        from lmforge.model.families import weights_to_hf

        sd = weights_to_hf(cfg, sd)
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{ours}.{kind}"
                if key not in sd:
                    continue
                t = sd[key]
                if arch == "llama" and ours == "self_attn.q_proj":
                    t = permute_for_llama_cpp(t, cfg.num_attention_heads)
                elif arch == "llama" and ours == "self_attn.k_proj":
                    t = permute_for_llama_cpp(t, cfg.num_key_value_heads)
                out[f"blk.{i}.{theirs}.{kind}"] = t
    if arch == "gemma3":
        out = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in out.items()}
    return out


def _tokenizer_fields(model_dir: Path) -> dict:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{model_dir / 'tokenizer.json'}: model.type {model.get('type')!r} is not BPE")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for t in tok.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED for holes
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = 3 if i in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def tid(key):
        val = cfg.get(key)
        val = val.get("content") if isinstance(val, dict) else val
        return vocab.get(val) if val is not None else None

    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return {"tokens": tokens, "types": types, "merges": merges, "bos": tid("bos_token"), "eos": tid("eos_token"),
            "pad": tid("pad_token"), "unk": tid("unk_token"), "chat_template": tpl}


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16",
                name: str | None = None) -> Path:
    """Write ``model_dir`` (HF layout with tokenizer files) as a llama.cpp GGUF file at ``out_path``."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    src, out = Path(model_dir), Path(out_path)
    if not (src / "tokenizer.json").exists():
        raise FileNotFoundError(f"{src} has no tokenizer.json: GGUF export needs the tokenizer")
    model = load_model(src)
    cfg = model.config
    arch = gguf_architecture(cfg)
    if cfg.rope_scaling:
        raise ValueError(f"rope_scaling {cfg.rope_scaling!r} has no GGUF export yet")
    tok = _tokenizer_fields(src)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or src.resolve().name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if arch != "llama" and cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(ftype)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                         ("unk", w.add_unk_token_id)):
            if tok[key] is not None:
                add(tok[key])
        w.add_add_bos_token(False)
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        sd = {k: v.detach().float() for k, v in model.state_dict().items()}
        for tname, t in tensor_map(cfg, sd).items():
            data = t.numpy().astype(np.float32)
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(tname, data.astype(np.float16))
            else:
                w.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
