"""The serving forward pass: a lean Llama forward over the engine's KV cache.

``ModelRunner`` takes a trained ``Llama`` and prepares its weights for inference once:

* q/k/v projections fused into one matmul, gate/up into one (fewer, larger matmuls per layer);
* weights in float32, bfloat16 (AMX/AVX-512-BF16 CPUs run it several times faster), or block-quantised
  (``lmforge.serve.kernels``, llama.cpp's layouts): ``int8`` = int8 with one float16 scale per 32 inputs (q8_0),
  ``int4`` = 4-bit with a scale and minimum per 32 inputs (q4_1) and an int8 output head.  Their matmul quantises the
  activation row per block of 32 (int16 against int8 weights, int8 against int4 ones) and takes exact integer dot
  products in a C++/AVX2 extension built on first use (weights with a multiple of 8 rows stored row-interleaved for
  it, ``kernels.pack_x8``); where it cannot be built, a pure-PyTorch reference with the same numerics runs on dequantised float32 weights
  (float32 speed and memory, one log line).  Everything between the matmuls (norms, RoPE, attention, the KV cache)
  runs in ``dtype``, except that a quantised model asked for bf16 computes it in float32 on CPUs without native bf16
  (AVX-512-BF16 / AMX): on an AVX2 CPU a bf16 attention over 256 cached positions takes ~20x longer than a float32 one;
* RoPE as ``x * cos + roll(x) * sin_signed`` with the position tables gathered once per step, not per layer;
* a decode step attends over a *view* of the cache when the batch's slots are contiguous (no gather of the whole
  prefix), and only the last real token of each row goes through ``lm_head``.
* one stream's decode step and speculative verify pass (up to ``FUSED_MAX_T`` positions), and a batch of decode rows
  (up to ``FUSED_MAX_ROWS``, each at its own position in its own cache slot: continuous batching, RL rollouts) run as
  one call into a fused C++ step (``kernels/fused_step.cpp``: every layer, the cache writes, attention over each row's
  slot in place, and the head, each weight read once for all rows; a row's logits are bit for bit those of its stream
  decoded alone) for the Llama-family switches it implements (float32 activations, SiLU, optional q/k bias,
  q/k norms and sliding windows); Gemma's norms and soft-capping, bf16 activations, or no C++ extension keep the
  Python path below (decided once at init, one log line; ``fused=False`` forces it);

It computes exactly what ``Llama.forward`` computes (a test checks logits and greedy tokens), for every family switch
of ``LlamaConfig`` (q/k norms, sliding-window layers with their own RoPE tables, Gemma's norms, embedding scale,
activation, attention scale and logit soft-capping); the model file stays the readable reference and the training
path, this is the hot path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge import hardware
from lmforge.model.llama import ACTIVATIONS, KVCache, Llama, window_mask
from lmforge.serve import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger("lmforge.serve")
# rows from which a quantised matmul in the row-major layout dequantises its weights and runs one dense float32 matmul
# instead of the kernel (a prefill; faster from about 64 rows: docs/benchmarks.md).  From 2 rows up to there it runs
# the fused step's few-row kernel, which reads each weight block once for all rows (1.3-1.6x the one-row kernel's loop
# at 4-16 rows, the same sums bit for bit).  Weights in the x8 layout always run their kernel: 1.3-1.6x faster than
# the dense path even at 800 rows on AVX2 (docs/benchmarks.md), and every row the same sums as a decode step
DENSE_ROWS = 64
# the most positions a fused step takes at once (a verify pass: the last token and its drafts); more: the Python path
FUSED_MAX_T = 16
# the most decode rows (one token each, every row in its own slot) a batched fused step takes; more: the Python path
# (MKL's matmuls; the fused kernels read each weight once for all rows and beat it at 16 rows: docs/benchmarks.md)
FUSED_MAX_ROWS = 64


class _Linear:
    """A weight prepared for inference: a plain matrix in ``dtype``, or block-quantised (``lmforge.serve.kernels``:
    ``q`` with scales ``d`` and, for int4, minima ``m``) run by the C++ kernel or, without it, by the reference on
    the dequantised float32 ``weight``.  With the kernel and a multiple of 8 rows, ``q``, ``d`` and ``m`` are in the
    row-interleaved layout (``x8``: ``kernels.pack_x8``), which the fused step's kernels multiply 8 rows at a time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 quantize: str | None) -> None:
        """``dtype``: what plain weights and the bias are stored in; the output has the input's dtype."""
        if quantize is not None and weight.shape[1] % kernels.QK:
            log.warning("a %d x %d linear stays unquantised: its input size is not a multiple of %d",
                        *weight.shape, kernels.QK)
            quantize = None
        self.quantize, self.weight, self.q, self.d, self.m, self.kernel = quantize, None, None, None, None, None
        self.x8 = False
        self.bias = None if bias is None else bias.detach().to(torch.float32 if quantize else dtype).contiguous()
        if quantize is None:
            self.weight = weight.detach().to(dtype).contiguous()
            return
        if quantize == "int8":
            self.q, self.d = kernels.quantize_q8(weight)
        else:
            self.q, self.d, self.m = kernels.quantize_q4(weight)
        self.kernel = kernels.load() if self.q.is_cpu else None
        if self.kernel is None:
            self.weight = (kernels.dequantize_q8(self.q, self.d) if self.m is None
                           else kernels.dequantize_q4(self.q, self.d, self.m))
        elif hasattr(self.kernel, "fused_linear") and self.q.shape[0] % 8 == 0:
            self.q, self.d, self.m = kernels.pack_x8(self.q, self.d, self.m)
            self.x8 = True

    def rowmajor(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q, d, m)`` in the row-major layout (``kernels.quantize_q8`` / ``quantize_q4``), a copy if stored x8."""
        return kernels.unpack_x8(self.q, self.d, self.m) if self.x8 else (self.q, self.d, self.m)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.q, self.d, self.m, self.bias) if t is not None]

    def set_rows(self, start: int, weight: torch.Tensor) -> None:
        """Overwrite output rows ``start .. start + len(weight)`` with ``weight``, prepared as at load (the block
        quantisation is per row, so the rows come out as a whole-matrix quantisation would give them)."""
        rows = slice(start, start + weight.shape[0])
        if self.quantize is None:
            self.weight[rows].copy_(weight)
            return
        q, d, m = kernels.quantize_q8(weight) + (None,) if self.quantize == "int8" else kernels.quantize_q4(weight)
        if self.x8:  # the groups of 8 rows concerned, packed again in place
            groups = slice(rows.start // 8, -(-rows.stop // 8))
            here = [None if t is None else t[groups] for t in (self.q, self.d, self.m)]
            if rows.start % 8 or rows.stop % 8:  # a group shared with rows kept: unpack, overwrite, pack
                rq, rd, rm = kernels.unpack_x8(*here)
                local = slice(rows.start - 8 * groups.start, rows.stop - 8 * groups.start)
                rq[local], rd[local] = q, d
                if rm is not None:
                    rm[local] = m
            else:  # whole groups (a q/k/v or gate/up block of a fused matrix, usually): nothing to keep
                rq, rd, rm = q, d, m
            for dst, src in zip(here, kernels.pack_x8(rq, rd, rm)):
                if dst is not None:
                    dst.copy_(src)  # views of the stored tensors: in place (the fused step holds them)
            return
        self.q[rows], self.d[rows] = q, d
        if m is not None:
            self.m[rows] = m
        if self.weight is not None:  # the reference path's dequantised copy
            self.weight[rows] = (kernels.dequantize_q8(self.q[rows], self.d[rows]) if self.m is None
                                 else kernels.dequantize_q4(self.q[rows], self.d[rows], self.m[rows]))

    def set_bias(self, start: int, bias: torch.Tensor) -> None:
        self.bias[start:start + bias.shape[0]].copy_(bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize is None:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        rows = x2.shape[0]
        if self.kernel is None:  # the reference on the dequantised weight
            y = (kernels.q8_matmul_reference(x2, self.q, self.d, self.weight) if self.m is None
                 else kernels.q4_matmul_reference(x2, self.q, self.d, self.m, self.weight))
        elif rows >= DENSE_ROWS and not self.x8:  # a prefill: dequantise once, one dense float32 matmul
            dense = self.kernel.dequantize(self.q, self.d, self.m)
            y = (kernels.q8_matmul_reference(x2, self.q, self.d, dense) if self.m is None
                 else kernels.q4_matmul_reference(x2, self.q, self.d, self.m, dense))
        elif self.x8 or (rows > 1 and hasattr(self.kernel, "fused_linear")):  # weights read once for all rows
            y = self.kernel.fused_linear(x2, [None, self.q, self.d, self.m, None])
        elif self.m is None:
            y = self.kernel.q8_matmul(x2, self.q, self.d)
        else:
            y = self.kernel.q4_matmul(x2, self.q, self.d, self.m)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


def _cat_bias(*linears) -> torch.Tensor | None:
    biases = [m.bias for m in linears]
    return None if all(b is None for b in biases) else torch.cat([b for b in biases])


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: _Linear
    o: _Linear
    ln2: torch.Tensor
    gate_up: _Linear
    down: _Linear
    kind: str = "full_attention"  # or "sliding_attention"
    q_norm: torch.Tensor | None = None  # qk_norm families
    k_norm: torch.Tensor | None = None
    post_ffn: torch.Tensor | None = None  # gemma_norms: ln2 is the attention output's norm, these wrap the MLP
    pre_ffn: torch.Tensor | None = None


class ModelRunner:
    """Inference weights + ``forward(ids, positions, cache, rows, last)`` returning next-token logits [B, vocab]."""

    def __init__(self, model: Llama, dtype: str | torch.dtype = "float32", quantize: str | None = None,
                 compile: bool = False, fused: bool = True) -> None:
        """``compile``: run single-stream decode steps through ``torch.compile`` (one graph per cache-slot class, built
        on first use, minutes on a small CPU; inductor keeps it in its on-disk cache, ``TORCHINDUCTOR_CACHE_DIR``),
        falling back to eager with one log line if it cannot be built; only where the fused C++ step does not run.
        ``fused``: run single-stream decode steps and verify passes through the fused C++ step where it supports the
        model (the module docstring); False: always the Python path."""
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
        cfg = model.config
        self.config, self.dtype, self.quantize = cfg, dtype, quantize
        # what norms, RoPE, attention and the KV cache compute in (the module docstring says why)
        act = dtype if quantize is None or hardware.native_bf16() else torch.float32
        self.act_dtype = act
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        m = model.model
        self.device = m.embed_tokens.weight.device
        self.embed = m.embed_tokens.weight.detach().to(act)
        # Gemma scales the embeddings by sqrt(hidden): the rows a step looks up, not a scaled copy of the whole table
        # (262k x 640 floats for Gemma 3, 671 MB); norm weights are stored as w - 1
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=act) if cfg.gemma_norms else None

        def norm(mod) -> torch.Tensor:
            w = mod.weight.detach().float()
            return (1.0 + w if cfg.gemma_norms else w).to(act)

        self.layers: list[_Layer] = []
        for layer, kind in zip(m.layers, cfg.layer_types):
            a, p = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                kind=kind,
                q_norm=norm(a.q_norm) if cfg.qk_norm else None, k_norm=norm(a.k_norm) if cfg.qk_norm else None,
                pre_ffn=norm(layer.pre_feedforward_layernorm) if cfg.gemma_norms else None,
                post_ffn=norm(layer.post_feedforward_layernorm) if cfg.gemma_norms else None,
                ln1=norm(layer.input_layernorm),
                qkv=_Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                            _cat_bias(a.q_proj, a.k_proj, a.v_proj), dtype, quantize),
                o=_Linear(a.o_proj.weight, a.o_proj.bias, dtype, quantize),
                ln2=norm(layer.post_attention_layernorm),
                gate_up=_Linear(torch.cat([p.gate_proj.weight, p.up_proj.weight]), _cat_bias(p.gate_proj, p.up_proj),
                                dtype, quantize),
                down=_Linear(p.down_proj.weight, p.down_proj.bias, dtype, quantize)))
        self.norm = norm(m.norm)
        # int4 keeps an int8 output head: 4-bit logits cost most of int4's quality (see quantize_llama_int4)
        self.lm_head = _Linear(model.lm_head.weight, None, dtype, "int8" if quantize == "int4" else quantize)
        half = self.hd // 2
        self.rope = {}  # layer kind -> (cos, sin with the rotate-half sign folded in)
        for kind in set(cfg.layer_types):
            local = kind == "sliding_attention" and cfg.rope_local_theta is not None
            cos, sin = (model.rope_local_cos, model.rope_local_sin) if local else (model.rope_cos, model.rope_sin)
            self.rope[kind] = cos.to(act), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(act)
        self.fused = self._fused_step() if fused else None
        self._compiled = torch.compile(self._decode_one, dynamic=True) if compile and self.fused is None else None
        self._places = self._weight_places(model)

    def _weight_places(self, model: Llama) -> dict[str, tuple]:
        """Where each ``Llama`` parameter lives here: ``("rows", linear, first row)`` in a (fused) matrix,
        ``("bias", linear, first row)``, ``("norm", tensor)`` or ``("plain", tensor)`` (the embedding table)."""
        cfg = self.config
        places: dict[str, tuple] = {"model.embed_tokens.weight": ("plain", self.embed),
                                    "model.norm.weight": ("norm", self.norm)}
        head = [("rows", self.lm_head, 0)]
        if cfg.tie_word_embeddings:  # one parameter, two prepared copies (or one shared tensor)
            places["model.embed_tokens.weight"] = ("tied", [("plain", self.embed), *head])
        places["lm_head.weight"] = places["model.embed_tokens.weight"] if cfg.tie_word_embeddings else head[0]
        for i, (layer, L) in enumerate(zip(model.model.layers, self.layers)):
            pre = f"model.layers.{i}."
            a = layer.self_attn
            offsets = {"q_proj": 0, "k_proj": a.q_proj.out_features,
                       "v_proj": a.q_proj.out_features + a.k_proj.out_features}
            for name, off in offsets.items():
                places[f"{pre}self_attn.{name}.weight"] = ("rows", L.qkv, off)
                places[f"{pre}self_attn.{name}.bias"] = ("bias", L.qkv, off)
            places[f"{pre}self_attn.o_proj.weight"] = ("rows", L.o, 0)
            places[f"{pre}self_attn.o_proj.bias"] = ("bias", L.o, 0)
            gate = layer.mlp.gate_proj.out_features
            for name, lin, off in (("gate_proj", L.gate_up, 0), ("up_proj", L.gate_up, gate), ("down_proj", L.down, 0)):
                places[f"{pre}mlp.{name}.weight"] = ("rows", lin, off)
                places[f"{pre}mlp.{name}.bias"] = ("bias", lin, off)
            for name, t in (("input_layernorm", L.ln1), ("post_attention_layernorm", L.ln2),
                            ("self_attn.q_norm", L.q_norm), ("self_attn.k_norm", L.k_norm),
                            ("pre_feedforward_layernorm", L.pre_ffn), ("post_feedforward_layernorm", L.post_ffn)):
                if t is not None:
                    places[f"{pre}{name}.weight"] = ("norm", t)
        return places

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        """Write trained ``Llama`` weights (parameter name → tensor, any subset) into the prepared ones in place, as a
        runner built from the updated model would hold them: a q/k/v or gate/up projection into its rows of the
        fused matrix, quantised per row where the runner is quantised, norms as at load.  Names it does not know
        raise ``KeyError``."""
        for name, w in weights.items():
            place = self._places.get(name)
            if place is None:
                raise KeyError(f"{name}: not a weight of this model's serving runner")
            for kind, *where in (place[1] if place[0] == "tied" else [place]):
                if kind == "rows":
                    where[0].set_rows(where[1], w.detach())
                elif kind == "bias":
                    where[0].set_bias(where[1], w.detach())
                elif kind == "norm":
                    w32 = w.detach().float()
                    where[0].copy_(1.0 + w32 if self.config.gemma_norms else w32)
                elif where[0].data_ptr() != w.data_ptr():
                    where[0].copy_(w.detach())

    def _fused_step(self):
        """The C++ fused step over this runner's weights (the same tensors, so ``Engine.load_weights`` reaches it), or
        None after one log line saying why the Python path runs."""
        cfg = self.config
        why = None
        if self.act_dtype != torch.float32:
            why = f"activations in {self.act_dtype}"
        elif cfg.gemma_norms or cfg.final_logit_softcapping or cfg.hidden_act != "silu":
            why = "Gemma norms, soft-capping or a non-SiLU activation"
        elif self.device.type != "cpu":
            why = f"device {self.device}"
        ext = kernels.load() if why is None else None
        if why is None and ext is None:
            why = "the C++ extension is unavailable"
        step = None
        if why is None:
            def lin(m: _Linear) -> list[torch.Tensor | None]:
                return [m.weight if m.q is None else None, m.q, m.d, m.m, m.bias]

            layers = []
            for L in self.layers:
                cos, sin = self.rope[L.kind]
                layers.append([L.ln1, L.ln2, L.q_norm, L.k_norm, cos.contiguous(), sin.contiguous(),
                               *lin(L.qkv), *lin(L.o), *lin(L.gate_up), *lin(L.down)])
            try:
                step = ext.FusedStep(self.embed, layers, [L.kind == "sliding_attention" for L in self.layers],
                                     self.norm, lin(self.lm_head), self.n_head, self.n_kv, self.hd, self.eps,
                                     self.scale, cfg.sliding_window or 0)
            except RuntimeError as err:  # a weight the step cannot take (e.g. an unquantised bf16 linear)
                why = f"{(str(err).strip().splitlines() or [''])[0][:200]}"
        if step is None:
            log.info("single-stream decode: the Python path (%s)", why)
        else:
            log.info("single-stream decode: the fused C++ step")
        return step

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor of the prepared model, in a fixed order (``Engine.load_weights`` copies them in place)."""
        def lin(m: _Linear) -> list[torch.Tensor]:
            return m.tensors()

        out = [self.embed]
        for L in self.layers:
            out += [L.ln1, L.ln2, *lin(L.qkv), *lin(L.o), *lin(L.gate_up), *lin(L.down)]
            out += [t for t in (L.q_norm, L.k_norm, L.post_ffn, L.pre_ffn) if t is not None]
        return out + [self.norm, *lin(self.lm_head)]

    def allocate_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, slots, max_len, dtype=self.act_dtype, device=self.device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[ids]
        return x if self.embed_scale is None else x * self.embed_scale

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: torch.Tensor,
                last: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """Logits (float32) [B, vocab] at column ``last[b]`` of each row (default: the last column).

        ``ids``/``positions`` [B, T]; row b's keys/values go to cache slot ``rows[b]`` at ``positions[b]``; a query at
        position p sees its row's keys at positions <= p.  With ``hidden``, return the final hidden states [B, T, h]
        (after the last norm) instead of logits."""
        B, T = ids.shape
        S = int(positions.max()) + 1
        if S > cache.max_len:
            raise ValueError(f"position {S - 1} exceeds the cache length {cache.max_len}")
        if T == 1 and 1 < B <= FUSED_MAX_ROWS and self.fused is not None and not hidden:
            # a batch of decode rows, each in its own slot: the fused step, attending in place (no gather, no mask)
            return self.fused.step_rows(ids.reshape(B), positions.reshape(B).to(torch.int64).contiguous(),
                                        rows.to(torch.int64).contiguous(), cache.k, cache.v)
        if B == 1 and T == 1 and not hidden:  # one stream's decode step: the fused or compiled step where there is one
            slot = int(rows[0])
            if self.fused is not None:
                return self.fused.step(ids.reshape(1), S - 1, slot, cache.k, cache.v, False)
            if self._compiled is not None:
                try:
                    return self._compiled(ids, positions, slot, S, cache.k, cache.v)
                except Exception as err:  # no compiler, an unsupported CPU...: the same step, eagerly, from now on
                    first = (str(err).strip().splitlines() or [""])[0]
                    log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly",
                                type(err).__name__, first[:200])
                    self._compiled = None
            return self._decode_one(ids, positions, slot, S, cache.k, cache.v)
        rope = {kind: (cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))  # [B, T, 1, hd]
                for kind, (cos, sin) in self.rope.items()}
        r0 = int(rows[0])
        contiguous = bool(torch.equal(rows, torch.arange(r0, r0 + B, device=rows.device)))
        if B == 1 and int(positions[0, 0]) == 0 and torch.equal(positions[0], torch.arange(T, device=ids.device)):
            mask = "causal"
        else:
            mask = window_mask(positions, torch.arange(S, device=ids.device)[None], None)  # [B,1,T,S]
        masks, start = {"full_attention": mask}, {"full_attention": 0}
        window = self.config.sliding_window
        if "sliding_attention" in self.rope:  # once a query is a window or more past key 0 it needs a band mask
            # keys a window or more behind every query of the batch are read by none: start the view after them
            lo = start["sliding_attention"] = max(int(positions.min()) - window + 1, 0)
            masks["sliding_attention"] = (window_mask(positions, torch.arange(lo, S, device=ids.device)[None], window)
                                          if S > window else mask)

        def attend(i: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ck, cv = cache.k[i], cache.v[i]
            ck[rows[:, None], :, positions] = k
            cv[rows[:, None], :, positions] = v
            lo = start[kind]
            if contiguous:
                keys, values = ck[r0:r0 + B, :, lo:S], cv[r0:r0 + B, :, lo:S]
            else:
                keys, values = ck[rows, :, lo:S], cv[rows, :, lo:S]
            m = masks[kind]
            if isinstance(m, str):  # "causal"
                return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale,
                                                      enable_gqa=self.n_kv != self.n_head)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=m, scale=self.scale,
                                                  enable_gqa=self.n_kv != self.n_head)

        x = self._layers(self._embed(ids), rope, attend)
        if hidden:
            return self._rms(x, self.norm)
        if last is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(B, device=x.device), last]
        return self._logits(x)

    def _decode_one(self, ids: torch.Tensor, positions: torch.Tensor, slot: int, S: int,
                    ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
        """One stream's decode step, logits [1, vocab]: token ``ids`` [1, 1] at ``positions`` [1, 1] = S - 1, keys and
        values into cache slot ``slot`` of ``ks``/``vs``, attending to its S cached positions, or to the last
        ``sliding_window`` of them in a sliding layer (views, no gather, no mask: the only query is the last position).
        It reads no tensor value on the Python side, so ``torch.compile`` traces it into one graph, dynamic in S."""
        return self._logits(self._one_stream(ids, positions, slot, S, ks, vs)[:, -1])

    @torch.inference_mode()
    def verify_logits(self, ids: torch.Tensor, start: int, cache: KVCache, slot: int) -> torch.Tensor:
        """Logits (float32) [T, vocab] at every position of one stream's tokens ``ids`` [1, T], placed at positions
        ``start .. start + T - 1`` of cache slot ``slot`` (a speculative verify pass: the last token and its drafts).
        The single-stream path of ``_decode_one`` with T queries: cache writes and reads by slicing, a [T, S] causal
        mask instead of ``forward``'s batched gather and index writes."""
        T = ids.shape[1]
        S = start + T
        if S > cache.max_len:
            raise ValueError(f"position {S - 1} exceeds the cache length {cache.max_len}")
        if self.fused is not None and T <= FUSED_MAX_T:
            return self.fused.step(ids.reshape(T), start, slot, cache.k, cache.v, True)
        positions = torch.arange(start, S, device=ids.device)[None]
        return self._logits(self._one_stream(ids, positions, slot, S, cache.k, cache.v)[0])

    def _one_stream(self, ids: torch.Tensor, positions: torch.Tensor, slot: int, S: int,
                    ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states [1, T, h] of one stream's last T tokens ``ids`` [1, T] at positions S - T .. S - 1 (the
        decode step's body; T > 1: a verify pass)."""
        T = ids.shape[1]
        rope = {kind: (cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))
                for kind, (cos, sin) in self.rope.items()}
        # a sliding layer reads only the cached positions some query can still see: a narrower view, O(window) per
        # step, and no mask at all for one query (T == 1)
        window = self.config.sliding_window or S
        start = {"full_attention": 0, "sliding_attention": max(S - T - window + 1, 0)}
        masks: dict[str, torch.Tensor | None] = {"full_attention": None, "sliding_attention": None}
        if T > 1:
            qpos = (S - T + torch.arange(T, device=ids.device))[:, None]
            for kind, lo in start.items():
                keys = torch.arange(lo, S, device=ids.device)[None]
                masks[kind] = (keys <= qpos) & (keys > qpos - window) if kind == "sliding_attention" else keys <= qpos

        def attend(i: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ck, cv = ks[i], vs[i]
            if T == 1:
                ck[slot, :, S - 1] = k[0, 0]
                cv[slot, :, S - 1] = v[0, 0]
            else:
                ck[slot, :, S - T:S] = k[0].transpose(0, 1)
                cv[slot, :, S - T:S] = v[0].transpose(0, 1)
            lo = start[kind]
            return F.scaled_dot_product_attention(q, ck[slot:slot + 1, :, lo:S], cv[slot:slot + 1, :, lo:S],
                                                  attn_mask=masks[kind], scale=self.scale,
                                                  enable_gqa=self.n_kv != self.n_head)

        return self._layers(self._embed(ids), rope, attend)

    def _layers(self, x: torch.Tensor, rope: dict, attend) -> torch.Tensor:
        """The decoder layers on hidden states ``x`` [B, T, h]; ``attend(i, kind, q, k, v)`` stores layer i's keys and
        values [B, T, n_kv, hd] in the cache and returns the attention output [B, n_head, T, hd] for ``q``."""
        B, T = x.shape[:2]
        nh, nkv, hd = self.n_head, self.n_kv, self.hd
        for i, L in enumerate(self.layers):
            qkv = L.qkv(self._rms(x, L.ln1)).view(B, T, nh + 2 * nkv, hd)
            qk = qkv[:, :, : nh + nkv]
            if L.q_norm is not None:
                qk = torch.cat([self._rms(qk[:, :, :nh], L.q_norm), self._rms(qk[:, :, nh:], L.k_norm)], dim=2)
            cos, sin = rope[L.kind]
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
            y = attend(i, L.kind, qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:], qkv[:, :, nh + nkv:])
            y = L.o(y.transpose(1, 2).reshape(B, T, nh * hd))
            if L.post_ffn is not None:  # Gemma: norm the attention output, then norm before and after the MLP
                x = x + self._rms(y, L.ln2)
                g, u = L.gate_up(self._rms(x, L.pre_ffn)).chunk(2, dim=-1)
                x = x + self._rms(L.down(self.act(g) * u), L.post_ffn)
                continue
            x = x + y
            g, u = L.gate_up(self._rms(x, L.ln2)).chunk(2, dim=-1)
            x = x + L.down(self.act(g) * u)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self._rms(x, self.norm)).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
