"""Training throughput: our Llama + training step vs. a plain ``transformers`` ``LlamaForCausalLM`` loop.

Same config, same batch, same dtype, same loss (mean next-token cross-entropy), AdamW with the same weight-decay
groups and gradient clipping, same machine, one process.  Rows per (model size, dtype):

* ``HF eager``            ``LlamaForCausalLM`` (sdpa attention) + ``F.cross_entropy(logits.float())`` + default AdamW
* ``HF compiled``         the same with ``torch.compile(model)``
* ``HF compiled step``    ``torch.compile`` of HF model *and* loss as one function
* ``ours eager``          ``Llama`` + ``F.cross_entropy(logits.float())`` + fused AdamW (what pretrain.py does)
* ``ours + fused loss``   ``Llama(x, return_hidden=True)`` + ``lmforge.train.loss.linear_cross_entropy``
* ``ours compiled``       ``torch.compile(model)`` + ``F.cross_entropy``
* ``ours compiled + fused loss``
* ``ours compiled step``  ``torch.compile`` of model *and* loss as one function (inductor fuses the cross-entropy)
* ``ours compiled step + fused loss``  ``torch.compile`` of model and ``linear_cross_entropy`` as one function

Each figure is the best of ``--repeats`` timings of ``--steps`` steps, the variants timed in turn (interleaved) so that
load from other processes hits all alike; the ratio is to ``HF eager`` of the same run.  ``first step s`` is the
first step's wall time (for compiled rows: the compile time).  The 1-minute load average is printed with each table.

    .venv/bin/python bench/train_speed.py                                   # demo (4M) and 20M, fp32 + bf16, all rows
    .venv/bin/python bench/train_speed.py --sizes demo --dtypes float32 --variants "HF eager" "ours + fused loss"
    .venv/bin/python bench/train_speed.py --threads 1 --clock cpu          # one core, CPU time: steadier when shared
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.model.llama import Llama, LlamaConfig
from lmforge.train.loss import linear_cross_entropy

SIZES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, batch)
    "demo": (256, 4, 4, 2, 704, 4096, 256, 16),  # recipes/demo.yaml
    "20M": (512, 6, 8, 4, 1376, 8192, 256, 8),
}
VARIANTS = ["HF eager", "HF compiled", "HF compiled step", "ours eager", "ours + fused loss", "ours compiled",
            "ours compiled + fused loss", "ours compiled step", "ours compiled step + fused loss"]
Step = Callable[[torch.Tensor, torch.Tensor], float]


def configs(size: str) -> tuple[LlamaConfig, int, int]:
    h, L, nh, nkv, inter, vocab, seq, batch = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=L,
                      num_attention_heads=nh, num_key_value_heads=nkv, max_position_embeddings=seq,
                      tie_word_embeddings=True)
    return cfg, seq, batch


def hf_model(cfg: LlamaConfig, state: dict) -> torch.nn.Module:
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hc = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
    hc._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hc)
    model.load_state_dict(state, strict=False)
    return model


def optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    """Ours: the fused AdamW ``lmforge.train.pretrain`` uses; HF: a plain loop's default AdamW."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95), fused=fused or None)


def make_step(variant: str, cfg: LlamaConfig, dtype: torch.dtype, chunk: int) -> tuple[Step, torch.nn.Module]:
    """A training step (forward, loss, backward, clip, AdamW) for one row of the table, on fresh identical weights."""
    torch.manual_seed(0)
    ours = Llama(cfg)
    ours.init_weights(seed=0)
    hf = variant.startswith("HF")
    model = hf_model(cfg, ours.state_dict()) if hf else ours
    model.train()
    opt = optimizer(model, fused=not hf)
    compiled = "compiled" in variant

    def plain_loss(x: torch.Tensor, y: torch.Tensor, fwd: torch.nn.Module) -> torch.Tensor:
        logits = fwd(input_ids=x).logits if hf else fwd(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    if variant in ("ours compiled step", "HF compiled step"):
        loss_fn = torch.compile(lambda x, y: plain_loss(x, y, model))
    elif variant == "ours compiled step + fused loss":
        loss_fn = torch.compile(lambda x, y: linear_cross_entropy(model(x, return_hidden=True), model.lm_head.weight,
                                                                  y, chunk_size=chunk))
    elif "fused loss" in variant:
        fwd = torch.compile(model) if compiled else model
        loss_fn = lambda x, y: linear_cross_entropy(fwd(x, return_hidden=True), model.lm_head.weight, y,
                                                    chunk_size=chunk)
    else:
        fwd = torch.compile(model) if compiled else model
        loss_fn = lambda x, y: plain_loss(x, y, fwd)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step, model


def interleaved(steps_by_name: dict[str, Step], x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                repeats: int, clock: Callable[[], float] = time.perf_counter
                ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(best seconds per ``steps`` steps by ``clock``, first-step wall seconds, first loss) per variant, in turn."""
    first, losses = {}, {}
    for name, step in steps_by_name.items():
        t0 = time.perf_counter()
        losses[name] = step(x, y)
        first[name] = time.perf_counter() - t0
        for _ in range(warmup):
            step(x, y)
    best = {name: float("inf") for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            t0 = clock()
            for _ in range(steps):
                step(x, y)
            best[name] = min(best[name], clock() - t0)
    return best, first, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the fused loss")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fp32-matmul", choices=["none", "bf16"], default="none",
                    help="torch.backends.mkldnn.matmul.fp32_precision (bf16: float32 matmuls on bf16 units, "
                         "like TF32 on GPUs); applies to every row")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time by this process's CPU seconds (needs --threads 1): robust to other processes "
                         "taking the cores, which stall a multi-threaded step at every parallel region")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures work only with --threads 1 (idle threads spin and burn CPU time)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.mkldnn.matmul.fp32_precision = args.fp32_matmul
    variants = ["HF eager"] + [v for v in args.variants if v != "HF eager"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, mkldnn fp32 matmul precision {args.fp32_matmul}; "
          f"best of {args.repeats} x {args.steps} steps by {args.clock} clock; fused-loss chunk {args.chunk}")
    for size in args.sizes:
        cfg, seq, batch = configs(size)
        data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
        x, y = data[:, :-1], data[:, 1:]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            steps, n_params = {}, 0
            for v in variants:
                steps[v], model = make_step(v, cfg, dtype, args.chunk)
                n_params = n_params or sum(p.numel() for p in model.parameters())
            load0 = os.getloadavg()[0]
            best, first, losses = interleaved(steps, x, y, args.steps, args.warmup, args.repeats, clock)
            print(f"\n{size} ({n_params / 1e6:.1f}M params, batch {batch} x {seq}), {dtype_name}, "
                  f"load average {load0:.1f} → {os.getloadavg()[0]:.1f}")
            print("| variant | tok/s | vs HF eager | first step s | first loss |")
            print("|---|---:|---:|---:|---:|")
            rate = {v: args.steps * batch * seq / best[v] for v in variants}
            for v in variants:
                print(f"| {v} | {rate[v]:,.0f} | {rate[v] / rate['HF eager']:.2f}x | {first[v]:.1f} | "
                      f"{losses[v]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
