"""Training throughput: our Llama + training step vs. a plain ``transformers`` ``LlamaForCausalLM`` loop.

Same config, same batch, same dtype, same optimizer (AdamW, weight-decay groups, grad clipping), same machine, one
process; the loss is the same next-token cross-entropy.  Prints tokens/s per (model size, dtype, compile) and the
ratio ours / HF.  Timings are the best of ``--repeats`` runs of ``--steps`` steps after ``--warmup`` steps.

    .venv/bin/python bench/train_speed.py                       # demo (4M) and ~20M models, fp32 + bf16
    .venv/bin/python bench/train_speed.py --sizes demo --compile  # add torch.compile rows

Other processes on the machine skew the figures: run it when ``uptime`` shows a low load.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from lmforge.model.llama import Llama, LlamaConfig

SIZES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, batch)
    "demo": (256, 4, 4, 2, 704, 4096, 256, 16),  # recipes/demo.yaml
    "20M": (512, 6, 8, 4, 1376, 8192, 256, 8),
}


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


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype, hf: bool):
    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=x).logits if hf else model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def interleaved_tokens_per_s(steps_by_name: dict, batch: int, seq: int, vocab: int, steps: int, warmup: int,
                             repeats: int) -> dict:
    """Best-of-``repeats`` tokens/s per step function, timing them in turn so that load drift hits all alike."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    for step in steps_by_name.values():
        for _ in range(warmup):
            step(x, y)
    best = {name: float("inf") for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: steps * batch * seq / t for name, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"best of {args.repeats} x {args.steps} steps")
    print(f"| model | params | dtype | compile | ours tok/s | HF tok/s | ours / HF |")
    print("|---|---:|---|---|---:|---:|---:|")
    for size in args.sizes:
        cfg, seq, batch = configs(size)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for compiled in ([False, True] if args.compile else [False]):
                steps = {}
                for hf in (False, True):
                    torch.manual_seed(0)
                    ours = Llama(cfg)
                    ours.init_weights(seed=0)
                    model = hf_model(cfg, ours.state_dict()) if hf else ours
                    model.train()
                    opt = optimizer(model, fused=not hf)
                    fwd = torch.compile(model) if compiled else model
                    steps[hf] = step_fn(fwd, opt, dtype, hf)
                rates = interleaved_tokens_per_s(steps, batch, seq, cfg.vocab_size, args.steps,
                                                 args.warmup + (2 if compiled else 0), args.repeats)
                n = sum(p.numel() for p in ours.parameters())
                print(f"| {size} | {n / 1e6:.1f}M | {dtype_name} | {compiled} | {rates[False]:,.0f} | "
                      f"{rates[True]:,.0f} | {rates[False] / rates[True]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
