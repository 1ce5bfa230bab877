"""Which Hugging Face model families load into ``lmforge.model.llama.Llama``, and how their files map onto it.

Each family is a Llama with a few switches on (``LlamaConfig``'s docstring lists them).  This module is the only place
that knows each family's ``config.json`` field names and file layout:

=============  ==========================  =================================================================
model_type     HF class                    switches
=============  ==========================  =================================================================
llama          LlamaForCausalLM            (none)
mistral        MistralForCausalLM          sliding_window on every layer (when set)
qwen2          Qwen2ForCausalLM            qkv_bias; sliding layers from ``max_window_layers`` when enabled
qwen3          Qwen3ForCausalLM            qk_norm; as Qwen2 for sliding layers
gemma3_text    Gemma3ForCausalLM           qk_norm, gemma_norms, gelu-tanh, local/global layers, own scale
phi3           Phi3ForCausalLM             fused ``qkv_proj`` / ``gate_up_proj`` in the files, sliding_window
=============  ==========================  =================================================================

``config_from_hf`` / ``config_to_hf`` convert ``config.json`` (transformers 4 and 5 spellings of RoPE settings);
``weights_from_hf`` / ``weights_to_hf`` convert a state dict between the family's file layout and ours.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import torch

from lmforge.model.llama import LlamaConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
SUPPORTED = tuple(sorted(ARCHITECTURES))
# transformers' defaults for fields a config.json may leave out (they differ between families)
_DEFAULTS = {
    "llama": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mistral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "qwen3": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "gemma3_text": {"tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
                    "hidden_act": "gelu_pytorch_tanh"},
    "phi3": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5},
}
# A family's own chat template, for files that carry none (a base model's GGUF): Gemma 3's is the one every
# google/gemma-3-* tokenizer_config.json ships, the base models' included (text parts only here).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
CHAT_TEMPLATES = {"gemma3_text": GEMMA3_CHAT_TEMPLATE}
# our fields that are not transformers fields of that name (written by hand in config_to_hf)
_OURS_ONLY = ("model_type", "qkv_bias", "qk_norm", "rope_local_theta", "gemma_norms")


class UnsupportedArchitecture(ValueError):
    pass


def check_supported(model_type: str | None) -> str:
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(f"model_type (architecture) {model_type!r} is not supported "
                                      f"(supported: {', '.join(SUPPORTED)})")
    return model_type


def _rope(d: dict, kind: str | None = None) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) from either spelling: transformers 4 (``rope_theta`` + ``rope_scaling``) or 5
    (``rope_parameters``, for Gemma 3 one dict per layer type)."""
    params = d.get("rope_parameters") or {}
    if kind is not None and kind in params:
        params = params[kind] or {}
    theta = params.get("rope_theta", d.get("rope_theta"))
    scaling = d.get("rope_scaling") if kind in (None, "full_attention") else None
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    return theta, scaling


def config_from_hf(d: dict) -> LlamaConfig:
    """Our config for an HF ``config.json`` dict of a supported family (clear errors for anything else)."""
    mt = check_supported(d.get("model_type", "llama"))
    d = {**_DEFAULTS[mt], **{k: v for k, v in d.items() if v is not None or k == "sliding_window"}}
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    if mt == "gemma3_text":
        theta, scaling = _rope(d, "full_attention")
        local, local_scaling = _rope({**d, "rope_theta": d.get("rope_local_base_freq", 10_000.0)},
                                     "sliding_attention")
        if local_scaling:
            raise ValueError(f"rope scaling of the sliding layers {local_scaling!r} is not supported")
        if d.get("attn_logit_softcapping"):
            raise ValueError("attn_logit_softcapping (Gemma 2) is not supported")
        layer_types = d.get("layer_types") or [
            "full_attention" if (i + 1) % d.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(d["num_hidden_layers"])]
        extra = dict(qk_norm=True, gemma_norms=True, rope_local_theta=float(local or 10_000.0),
                     sliding_window=d.get("sliding_window"),
                     layer_types=layer_types, query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
                     final_logit_softcapping=d.get("final_logit_softcapping"))
    else:
        theta, scaling = _rope(d)
        extra = {"qkv_bias": mt == "qwen2", "qk_norm": mt == "qwen3"}
        if mt in ("qwen2", "qwen3"):
            window = d.get("sliding_window") if d.get("use_sliding_window") else None
            layer_types = d.get("layer_types") or (
                None if window is None else ["sliding_attention" if i >= d.get("max_window_layers", 0)
                                             else "full_attention" for i in range(d["num_hidden_layers"])])
            if window is None and layer_types and "sliding_attention" in layer_types:
                window = d.get("sliding_window")
            extra.update(sliding_window=window, layer_types=layer_types)
        elif mt in ("mistral", "phi3"):
            extra.update(sliding_window=d.get("sliding_window"))
    if mt == "phi3" and scaling:
        raise ValueError(f"rope_scaling type {scaling.get('rope_type', scaling.get('type'))!r} is not supported "
                         "(Phi-3's long-context 'longrope'); use a 4k-context Phi-3")
    names = {f.name for f in fields(LlamaConfig)} - set(_OURS_ONLY) - {"layer_types", "sliding_window"}
    kw = {k: v for k, v in d.items() if k in names}
    kw.update(extra, model_type=mt, hidden_act=act, rope_scaling=scaling)
    if theta is not None:
        kw["rope_theta"] = float(theta)
    if mt in ("mistral", "qwen2", "phi3"):
        kw.pop("attention_bias", None)  # these classes have no such field: the bias layout is fixed
    return LlamaConfig(**kw)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The ``config.json`` dict that ``transformers`` (4 and 5) reads as ``cfg``'s family."""
    mt = check_supported(cfg.model_type)
    d = {k: v for k, v in asdict(cfg).items() if k not in _OURS_ONLY}
    d.update(architectures=[ARCHITECTURES[mt]], model_type=mt, attention_dropout=0.0, use_cache=True,
             torch_dtype="float32", rope_scaling=cfg.rope_scaling)
    if mt == "llama":
        d["pretraining_tp"] = 1
    if mt == "gemma3_text":
        d["hidden_activation"] = d.pop("hidden_act")
        d["rope_local_base_freq"] = cfg.rope_local_theta
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim  # transformers 5 insists on an int where it is one
        d["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        d["attn_logit_softcapping"] = None
    elif mt in ("qwen2", "qwen3"):
        sliding = "sliding_attention" in cfg.layer_types
        d["use_sliding_window"] = sliding
        d["max_window_layers"] = cfg.layer_types.index("sliding_attention") if sliding else cfg.num_hidden_layers
        if not sliding:
            d.pop("layer_types")
    else:
        if mt in ("mistral", "phi3") and len(set(cfg.layer_types)) > 1:
            raise ValueError(f"{mt} applies its sliding window to every layer; layer_types mixes both kinds")
        d.pop("layer_types")
    if mt == "phi3":
        d["original_max_position_embeddings"] = cfg.max_position_embeddings
    return d


def weights_from_hf(cfg: LlamaConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A family's state dict (HF names) → ours: drops RoPE buffers, splits Phi-3's fused projections."""
    out = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    if cfg.model_type != "phi3":
        return out
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for name in [k for k in out if k.endswith(("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"))]:
        w, prefix = out.pop(name), name.rsplit(".", 2)[0]
        if name.endswith("qkv_proj.weight"):
            out[f"{prefix}.q_proj.weight"], out[f"{prefix}.k_proj.weight"], out[f"{prefix}.v_proj.weight"] = \
                w.split([q, kv, kv])
        else:
            out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = w.chunk(2)
    return out


def weights_to_hf(cfg: LlamaConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → the family's file layout (Phi-3: q/k/v and gate/up fused again)."""
    if cfg.model_type != "phi3":
        return sd
    out = dict(sd)
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out[f"{a}.qkv_proj.weight"] = torch.cat([out.pop(f"{a}.{p}_proj.weight") for p in "qkv"])
        out[f"{m}.gate_up_proj.weight"] = torch.cat([out.pop(f"{m}.gate_proj.weight"), out.pop(f"{m}.up_proj.weight")])
    return out
