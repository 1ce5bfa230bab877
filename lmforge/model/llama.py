"""A Llama-architecture language model in one file.

RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP, grouped-query attention, optional tied embeddings.  Parameter
names equal Hugging Face ``LlamaForCausalLM``'s (``model.layers.0.self_attn.q_proj.weight`` ...) and ``LlamaConfig``
uses the same field names as ``transformers.LlamaConfig``, so a folder we save loads in ``transformers`` / vLLM /
llama.cpp converters and theirs loads here.

Decoding uses a preallocated ``KVCache`` with one *slot* per sequence.  ``forward`` takes absolute ``positions`` per
token, so rows of one batch may sit at different positions (what continuous batching needs): each new key/value is
written at its position in its row's slot, and a query at position p attends to the keys at positions <= p.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


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

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    # -- Hugging Face config.json ---------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_dropout=0.0,
            pretraining_tp=1,
            rope_scaling=None,
            use_cache=True,
            torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {d.get('model_type')!r} is not supported (expected 'llama')")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported yet")
        rope = d.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta here
        if rope:
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"rope_type {rope['rope_type']!r} is not supported yet")
            if "rope_theta" not in d:
                d = {**d, "rope_theta": rope.get("rope_theta", 10000.0)}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_params(self) -> int:
        h, i, L, V, hd = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        return V * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_tables(cfg: LlamaConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_position_embeddings, head_dim] (the 'rotate half' layout HF Llama uses)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
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
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_head * self.hd, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.hd, h, bias=b)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, rows: torch.Tensor | None,
                doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None and doc_mask is not None:  # packed sequences: causal within each segment only
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask, enable_gqa=self.n_kv != self.n_head)
        elif cache is None:  # training / full recompute: plain causal attention over this chunk
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_head)
        else:
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            # write this chunk's keys/values at their positions in each row's slot
            ck[rows[:, None], :, positions] = k.transpose(1, 2).to(ck.dtype)
            cv[rows[:, None], :, positions] = v.transpose(1, 2).to(cv.dtype)
            S = int(positions.max()) + 1
            keys, values = ck[rows, :, :S], cv[rows, :, :S]
            # a query at position p sees the keys at positions <= p of its own row
            mask = torch.arange(S, device=x.device)[None, None, :] <= positions[:, :, None]  # [B, T, S]
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask[:, None],
                                               enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, cache, rows, doc_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, rows, doc_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The transformer body (HF's ``model.`` prefix)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever ``segment_ids`` [B, T] changes value along a row."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.cummax(torch.where(is_start, idx, 0), dim=1).values


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

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, rows: torch.Tensor | None = None,
                last_only: bool = False, segment_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with ``last_only``).

        ``return_hidden``: return the final-norm hidden states [B, T, hidden] instead, without the head (for a loss that
        applies ``lm_head.weight`` itself, such as ``lmforge.train.loss.linear_cross_entropy``).

        ``positions`` [B, T]: absolute position of each token (default 0..T-1).  With a ``cache``, ``rows`` [B] names the
        cache slot of each batch row (default 0..B-1) and keys/values are read from and written to it.

        ``segment_ids`` [B, T] (training path only, no cache): several documents packed into one row; a token attends
        only to earlier tokens with the same id, and positions restart at 0 at each new segment (unless given).
        """
        B, T = input_ids.shape
        doc_mask = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids is for the training path; it cannot be combined with a KV cache")
            doc_mask = segment_mask(segment_ids)
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:  # 0..T-1: checked without reading a tensor back (no graph break under torch.compile)
            if T > self.config.max_position_embeddings:
                raise ValueError(f"position {T - 1} exceeds the context length {self.config.max_position_embeddings}")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        elif int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} exceeds the context length "
                             f"{self.config.max_position_embeddings}")
        if cache is not None and rows is None:
            rows = torch.arange(B, device=input_ids.device)
        cos = self.rope_cos[positions].unsqueeze(1)  # [B, 1, T, hd]
        sin = self.rope_sin[positions].unsqueeze(1)
        x = self.model.embed_tokens(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, cache, rows, doc_mask)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:, :]
        return x if return_hidden else self.lm_head(x)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; ``targets`` equal to ``ignore_index`` do not count."""
        logits = self(input_ids, segment_ids=segment_ids)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
