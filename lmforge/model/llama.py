"""A Llama-architecture language model in one file, with the few switches its descendants need.

RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP, grouped-query attention, optional tied embeddings.  Parameter
names equal Hugging Face ``LlamaForCausalLM``'s (``model.layers.0.self_attn.q_proj.weight`` ...) and ``LlamaConfig``
uses the same field names as ``transformers.LlamaConfig``, so a folder we save loads in ``transformers`` / vLLM /
llama.cpp converters and theirs loads here.

The other families are Llamas with a handful of differences, each one a named ``LlamaConfig`` field (all off = Llama;
``lmforge.model.families`` maps each family's ``config.json`` onto them):

* ``qkv_bias`` — a bias on the q/k/v projections only (Qwen2 / Qwen2.5);
* ``qk_norm`` — an RMSNorm over each head's query and key before RoPE (Qwen3, Gemma 3);
* ``sliding_window`` + ``layer_types`` — layers that see only the last ``sliding_window`` keys (Mistral, Phi-3: all
  layers; Gemma 3: five local layers per global one, the local ones with their own RoPE base ``rope_local_theta``);
* ``gemma_norms`` — Gemma's ``(1 + w)`` RMSNorm computed in float32, a norm after attention and around the MLP too
  (pre + post), and embeddings multiplied by ``sqrt(hidden_size)``; ``hidden_act`` ``gelu_pytorch_tanh`` and
  ``query_pre_attn_scalar`` (attention scale ``1/sqrt(scalar)``) and ``final_logit_softcapping`` come with it;
* Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are a file layout only: they are split on load and fused on save.

Decoding uses a preallocated ``KVCache`` with one *slot* per sequence.  ``forward`` takes absolute ``positions`` per
token, so rows of one batch may sit at different positions (what continuous batching needs): each new key/value is
written at its position in its row's slot, and a query at position p attends to the keys at positions <= p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.prefix_groups import PrefixGroups


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor": f} or Llama 3's "llama3"; None: plain RoPE
    # -- family switches (see the module docstring); the defaults are Llama --------------------------------------------
    model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention"
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    gemma_norms: bool = False
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None  # None: head_dim
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types must name {self.num_hidden_layers} layers, each one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        rope_frequencies(self, self.rope_theta, self.rope_scaling)  # an unknown rope_scaling type fails here

    def window(self, layer_idx: int) -> int | None:
        """How many keys back layer ``layer_idx`` sees (None: all of them)."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    # -- Hugging Face config.json (per family: lmforge.model.families) -------------------------------------------------
    def to_hf_dict(self) -> dict:
        from lmforge.model.families import config_to_hf

        return config_to_hf(self)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        from lmforge.model.families import config_from_hf

        return config_from_hf(d)

    def num_params(self) -> int:
        h, i, L, V, hd = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        return V * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nn.Module):
    """``w * x / rms(x)``; with ``plus_one`` (Gemma) the weight is stored as ``w - 1`` and the product is taken in
    float32 before casting back (HF's ``Gemma3RMSNorm``), otherwise ``x`` is cast back first (HF's ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.plus_one:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def rope_frequencies(cfg: LlamaConfig, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The RoPE inverse frequencies [head_dim / 2] for base ``theta``, rescaled as ``scaling`` says (HF's rules)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "linear":  # positions divided by factor
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":  # long wavelengths slowed by factor, short ones kept, a smooth ramp between
        factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(
            scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor,
                               torch.where(wavelen < old_ctx / high, inv_freq, smoothed))
    return inv_freq


def rope_tables(cfg: LlamaConfig, device: torch.device | None = None,
                local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_position_embeddings, head_dim] (the 'rotate half' layout HF Llama uses).

    ``local``: the tables of the sliding layers when they have their own base (Gemma 3's ``rope_local_theta``, which
    is never rescaled)."""
    if local:
        inv_freq = rope_frequencies(cfg, cfg.rope_local_theta)
    else:
        inv_freq = rope_frequencies(cfg, cfg.rope_theta, cfg.rope_scaling)
    inv_freq = inv_freq.to(device)
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hd]; cos/sin: [B, 1, T, hd]
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Preallocated keys and values: ``k[layer]`` has shape [slots, n_kv_heads, max_len, head_dim]."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def allocate(cls, cfg: LlamaConfig, slots: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        max_len = max_len or cfg.max_position_embeddings
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        L = cfg.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_head * self.hd, bias=b or cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.hd, bias=b or cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.hd, bias=b or cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, h, bias=b)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, plus_one=cfg.gemma_norms)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, plus_one=cfg.gemma_norms)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, rows: torch.Tensor | None,
                mask: torch.Tensor | PrefixGroups | None = None) -> torch.Tensor:
        """``mask`` [B, 1, T, S] (True = may attend) or a ``PrefixGroups`` layout (no cache); None means plain causal
        over this chunk (no cache only)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_head

        if cache is None and mask is None:  # training / full recompute: plain causal attention over this chunk
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale, enable_gqa=gqa)
        elif isinstance(mask, PrefixGroups):  # GRPO's packed groups, block by block
            y = mask.attend(q, k, v, self.scale)
        elif cache is None:  # packed documents and/or a sliding window
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        else:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            # write this chunk's keys/values at their positions in each row's slot
            ck[rows[:, None], :, positions] = k.transpose(1, 2).to(ck.dtype)
            cv[rows[:, None], :, positions] = v.transpose(1, 2).to(cv.dtype)
            S = mask.shape[-1]
            keys, values = ck[rows, :, :S], cv[rows, :, :S]
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                               scale=self.scale, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block; with ``gemma_norms`` the attention and MLP outputs are normed again before the add."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, g = cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms
        self.gemma_norms = g
        self.input_layernorm = RMSNorm(h, eps, g)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps, g)
        if g:  # Gemma: post_attention_layernorm normalises the attention output; the MLP gets a norm on each side
            self.pre_feedforward_layernorm = RMSNorm(h, eps, g)
            self.post_feedforward_layernorm = RMSNorm(h, eps, g)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, cache, rows, mask=None):
        if self.gemma_norms:
            x = x + self.post_attention_layernorm(
                self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, rows, mask))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, rows, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The transformer body (HF's ``model.`` prefix)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever ``segment_ids`` [B, T] changes value along a row."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.cummax(torch.where(is_start, idx, 0), dim=1).values


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: query at ``q_pos`` [B, T] sees a key at ``k_pos`` [B or 1, S] when it is not later
    and, with a ``window``, fewer than ``window`` positions back (HF's sliding-window rule)."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    m = d >= 0
    if window is not None:
        m = m & (d < window)
    return m[:, None]


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, T]: a token sees the earlier tokens of its own segment only."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.rope_local_theta is not None:  # Gemma 3: the sliding layers rotate with their own base
            cos, sin = rope_tables(cfg, local=True)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p) if self.config.gemma_norms else nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, rows: torch.Tensor | None = None,
                last_only: bool = False, segment_ids: torch.Tensor | None = None,
                return_hidden: bool = False, attention_mask: torch.Tensor | PrefixGroups | None = None
                ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with ``last_only``).

        ``return_hidden``: return the final-norm hidden states [B, T, hidden] instead, without the head (for a loss that
        applies ``lm_head.weight`` itself, such as ``lmforge.train.loss.linear_cross_entropy``).

        ``positions`` [B, T]: absolute position of each token (default 0..T-1).  With a ``cache``, ``rows`` [B] names the
        cache slot of each batch row (default 0..B-1) and keys/values are read from and written to it.

        ``segment_ids`` [B, T] (training path only, no cache): several documents packed into one row; a token attends
        only to earlier tokens with the same id, and positions restart at 0 at each new segment (unless given).
        Without ``segment_ids`` or a cache, the rows are taken to start at position 0 (the causal mask is by column).

        ``attention_mask`` [B, 1, T, T] (training path only, True = may attend): a layout that ``segment_ids`` cannot
        express; or a ``PrefixGroups`` (GRPO's packed groups: a prompt and its completions in one row, each completion
        seeing the prompt and itself), computed block by block; give the ``positions`` with it.
        """
        B, T = input_ids.shape
        cfg = self.config
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids is for the training path; it cannot be combined with a KV cache")
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:  # 0..T-1: checked without reading a tensor back (no graph break under torch.compile)
            if T > cfg.max_position_embeddings:
                raise ValueError(f"position {T - 1} exceeds the context length {cfg.max_position_embeddings}")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        elif int(positions.max()) >= cfg.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} exceeds the context length "
                             f"{cfg.max_position_embeddings}")
        if cache is not None and rows is None:
            rows = torch.arange(B, device=input_ids.device)
        if attention_mask is not None and (cache is not None or segment_ids is not None):
            raise ValueError("attention_mask is for the training path, without a KV cache or segment_ids")
        masks = self._masks(positions, cache, segment_ids)
        if attention_mask is not None:  # a sliding window combines with the layout as a dense mask
            dense = attention_mask.dense(input_ids.device) if isinstance(attention_mask, PrefixGroups) \
                else attention_mask
            masks = {kind: attention_mask if m is None else m & dense for kind, m in masks.items()}
        x = self.model.embed_tokens(input_ids)
        if cfg.gemma_norms:  # Gemma scales the embeddings by sqrt(hidden), rounded to the weights' dtype as HF does
            x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)
        rope = {"full_attention": (self.rope_cos, self.rope_sin), "sliding_attention": (self.rope_cos, self.rope_sin)}
        if cfg.rope_local_theta is not None:
            rope["sliding_attention"] = (self.rope_local_cos, self.rope_local_sin)
        rope = {kind: (c[positions].unsqueeze(1).to(x.dtype), s[positions].unsqueeze(1).to(x.dtype))  # [B,1,T,hd]
                for kind, (c, s) in rope.items() if kind in cfg.layer_types}
        for layer, kind in zip(self.model.layers, cfg.layer_types):
            x = layer(x, *rope[kind], positions, cache, rows, masks[kind])
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:, :]
        if return_hidden:
            if cfg.final_logit_softcapping:
                raise ValueError("return_hidden skips final_logit_softcapping: compute the loss from the logits")
            return x
        logits = self.lm_head(x)
        if cfg.final_logit_softcapping:
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    def _masks(self, positions: torch.Tensor, cache: KVCache | None,
               segment_ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The attention mask of each layer type (None: plain causal, the fast path)."""
        cfg, T = self.config, positions.shape[1]
        masks: dict[str, torch.Tensor | None] = {}
        for kind in set(cfg.layer_types):
            window = cfg.sliding_window if kind == "sliding_attention" else None
            if cache is not None:  # a query at position p sees its row's keys at positions <= p (and > p - window)
                S = int(positions.max()) + 1
                masks[kind] = window_mask(positions, torch.arange(S, device=positions.device)[None], window)
            elif segment_ids is not None:  # packed documents: causal within each segment only
                masks[kind] = segment_mask(segment_ids)
                if window is not None and T > window:
                    masks[kind] = masks[kind] & window_mask(positions, positions, window)
            elif window is not None and T > window:
                masks[kind] = window_mask(positions, positions, window)
            else:
                masks[kind] = None
        return masks

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; ``targets`` equal to ``ignore_index`` do not count."""
        logits = self(input_ids, segment_ids=segment_ids)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
