"""The pretraining stage: train a Llama from scratch on packed token shards.

AdamW with weight-decay groups, linear warmup + cosine decay, gradient accumulation and clipping, periodic validation
loss, atomic checkpoints (resume after a crash picks up at the newest one), ``metrics.jsonl`` and ``loss.png``.  The
artifact folder is itself a Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer files), so
``transformers``, ``lmforge serve`` and ``lmforge eval`` load it directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from lmforge.artifacts import Manifest
from lmforge.config import StageConfig
from lmforge.model.hf import save_model
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.progress import console, progress, rate_text
from lmforge.stages import begin, finished
from lmforge.tokenizer.shards import eval_windows, load_split, read_index
from lmforge.train.batches import sample_batch
from lmforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.plots import plot_loss
from lmforge.train.schedule import lr_at

STAGE = "pretrain"
VERSION = "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class Config(StageConfig):
    """Pretrain a Llama model from scratch on a tokenizer artifact's packed shards."""

    tokenizer: str = Field(description="Tokenizer artifact folder (tokenizer.json + tokens/).")
    hidden_size: int = Field(256, ge=8, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(0, ge=0, description="SwiGLU width; 0 derives ~8/3 x hidden rounded to 32.")
    tie_embeddings: bool = Field(True, description="Share the input embedding and output head.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    seq_len: int = Field(256, ge=8, description="Training context length (also the saved model's context).")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(40, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables).")
    eval_every: int = Field(100, ge=1, description="Steps between validation-loss measurements.")
    eval_windows: int = Field(16, ge=1, description="Validation windows per measurement.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Autocast dtype for the forward pass.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    seed: int = Field(1337, description="Seed for initialisation and batch sampling.")


def model_config(cfg: Config, vocab_size: int, eos_id: int) -> LlamaConfig:
    inter = cfg.intermediate_size or int(math.ceil(cfg.hidden_size * 8 / 3 / 32) * 32)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=inter, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.seq_len,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def make_optimizer(model: Llama, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (2-D weights) and none on norms and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


@torch.no_grad()
def validation_loss(model: Llama, tokens, seq_len: int, max_windows: int, dtype: torch.dtype) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_windows(tokens, seq_len, max_windows):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()
    model.train()
    return total / max(1, count)


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"tokenizer": config.tokenizer}, force=force)
    if run_ is None:
        return finished(out)
    resume = run_.resumable()
    with run_:
        if not resume:  # a fresh run starts from an empty folder
            for stale in ("checkpoints", "metrics.jsonl"):
                p = out / stale
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        run_.metrics.update(train(config, out))
    return finished(out)


def train(cfg: Config, out: Path) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok_dir = Path(cfg.tokenizer)
    index = read_index(tok_dir / "tokens")
    train_tokens = load_split(tok_dir / "tokens", "train")
    val_tokens = load_split(tok_dir / "tokens", "val")
    mcfg = model_config(cfg, index["vocab_size"], index["eos_id"])
    torch.manual_seed(cfg.seed)
    model = Llama(mcfg)
    model.init_weights(seed=cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32

    step = 0
    ckpt = latest_checkpoint(out / "checkpoints")
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        step = state["step"]
        console.print(f"  resumed from {ckpt} (step {step})")
        # drop metrics logged after the checkpoint: they will be logged again
        if metrics_path.exists():
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= step]
            metrics_path.write_text("".join(l + "\n" for l in kept))
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    console.print(f"  model: {n_params / 1e6:.2f}M parameters, {mcfg.num_hidden_layers} layers x {mcfg.hidden_size}; "
                  f"{len(train_tokens):,} train tokens, {tokens_per_step:,} tokens/step, {cfg.max_steps} steps")

    last_loss = float("nan")
    val_loss = float("nan")
    t_start = time.time()
    tokens_seen = 0
    with open(metrics_path, "a") as mf, progress() as bar:
        task = bar.add_task("pretraining", total=cfg.max_steps, completed=step, rate="")
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = sample_batch(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed, step * cfg.grad_accum + micro)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().item() / cfg.grad_accum
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum} at step {step}; lower the learning rate "
                                         f"(lr={cfg.lr}) or check the data")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            last_loss = loss_sum
            rec = {"step": step, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                   "tokens": step * tokens_per_step}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val_loss = validation_loss(model, val_tokens, cfg.seq_len, cfg.eval_windows, dtype)
                rec["val_loss"] = round(val_loss, 5)
            elapsed = time.time() - t_start
            rec["tokens_per_s"] = round(tokens_seen / max(elapsed, 1e-9))
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(out / "checkpoints", step, model, opt, {"seed": cfg.seed}, keep=cfg.keep_checkpoints)
            bar.update(task, completed=step,
                       rate=f"loss {loss_sum:.3f} " + rate_text(tokens_seen, elapsed, "tok"))

    train_seconds = time.time() - t_start
    save_model(model.eval(), out)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    plot_loss(metrics_path, out / "loss.png", title=f"pretraining ({n_params / 1e6:.2f}M params)")
    return {
        "params": n_params,
        "steps": step,
        "tokens_trained": step * tokens_per_step,
        "final_train_loss": round(last_loss, 4),
        "final_val_loss": round(val_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9)),
    }
