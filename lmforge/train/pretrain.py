"""The pretraining stage: train a Llama from scratch on packed token shards.

AdamW with weight-decay groups, linear warmup + cosine or WSD decay, gradient accumulation and clipping, periodic
validation loss, atomic checkpoints (resume after a crash picks up at the newest one, bit-exactly), ``metrics.jsonl``
(loss, lr, grad norm, tokens/s, MFU, validation loss), TensorBoard events under ``tensorboard/`` and ``loss.png``.
The artifact folder is itself a Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer files),
so ``transformers``, ``lmforge serve`` and ``lmforge eval`` load it directly.

Data parallel: ``torchrun --nproc_per_node N -m lmforge.cli pretrain ...`` runs DDP (gloo on CPU, nccl on GPU); every
rank trains on its rows of the same global batch, so the run equals a single-process run up to float rounding, and
only rank 0 writes files.  ``--parallel fsdp`` shards parameters, gradients and optimizer state instead (FSDP2
``fully_shard``, see ``train/distributed.py``), with the same results and the same checkpoint and model files.

A token mixture (several sources in the tokenizer artifact) is sampled by target weights, optionally moving linearly
to ``mixture_weights_end`` over training (a curriculum).

``init_from`` continues pretraining from an existing HF Llama folder (``lmforge/train/init_from.py``; pack the data
with the model's own tokenizer: ``lmforge tokenizer train --from-tokenizer MODEL``); ``activation_checkpointing``
recomputes each decoder layer in the backward pass (applied from outside the model).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field

from lmforge.artifacts import Manifest
from lmforge.hardware import resolve_dtype
from lmforge.config import ConfigError, StageConfig
from lmforge.model.hf import save_model
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.progress import console, rate_text
from lmforge.stages import begin, overwrite_is_allowed
from lmforge.tokenizer.shards import eval_windows, load_sources, load_split, read_index
from lmforge.train import core, distributed
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.batches import mixture_weights_at, sample_batch, sample_mixture_batch
from lmforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.distributed import World
from lmforge.train.flops import flops_per_token, mfu, peak_flops
from lmforge.train.init_from import load_initial_model
from lmforge.train.loss import linear_cross_entropy
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
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="LR decay: cosine, or wsd (warmup-stable-decay).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying (at the end).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables).")
    eval_every: int = Field(100, ge=1, description="Steps between validation-loss measurements.")
    eval_windows: int = Field(16, ge=1, description="Validation windows per measurement.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Autocast dtype for the forward pass; auto: bfloat16 where the GPU or CPU computes it "
                               "natively (AVX-512-BF16/AMX), else float32 (emulated bf16 is slower).")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device (auto: CUDA when present).")
    compile: bool = Field(False, description="torch.compile the model (in a single process: model + loss as one "
                                             "graph).")
    fused_loss: bool = Field(True, description="Head + cross-entropy in chunks of rows (lmforge/train/loss.py): the "
                                               "[tokens, vocab] float32 logits are never materialised.")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp (replicated model) or fsdp "
                                                                "(FSDP2: parameters, gradients and optimizer state "
                                                                "sharded over the processes).")
    fsdp_reshard_after_forward: bool = Field(True, description="fsdp: free each layer's gathered parameters after "
                                                               "its forward (less memory, one more all-gather).")
    activation_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward "
                                                              "pass (less memory, ~1/3 more compute).")
    init_from: Optional[str] = Field(None, description="Continued pretraining: start from this HF Llama model folder "
                                                       "(its config.json fixes the shape; the shape fields are "
                                                       "ignored; the tokenizer must be the model's own).")
    mixture_weights: list[float] = Field(default_factory=list,
                                         description="Target weight per mixture source (empty: the tokenizer's).")
    mixture_weights_end: list[float] = Field(default_factory=list,
                                             description="Curriculum: weights reached at max_steps (linear); empty: fixed.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under tensorboard/.")
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
    """AdamW with weight decay on matrices (2-D weights) and none on norms and biases (``core.make_optimizer``)."""
    return core.make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))


@torch.no_grad()
def validation_loss(model: Llama, tokens, seq_len: int, max_windows: int, dtype: torch.dtype,
                    device: torch.device = torch.device("cpu")) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_windows(tokens, seq_len, max_windows):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()
    model.train()
    return total / max(1, count)


# fields whose change makes an existing checkpoint unusable: a changed run with any of these starts afresh
SHAPE_FIELDS = ("tokenizer", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "tie_embeddings", "init_from")


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: old → new`` for every config field that differs."""
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _plan(config: Config, out: Path, force: bool) -> tuple[str, Any]:
    """Rank 0 decides: ``("skip", None)``, ``("error", message)`` or ``("train", (StageRun, resume))``."""
    inputs = {"tokenizer": config.tokenizer}
    if config.init_from:
        inputs["init_from"] = config.init_from
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force)
    if run_ is None:
        return "skip", None
    prev = run_.previous()
    if prev is not None and prev.status == "done" and not force and not overwrite_is_allowed():
        changes = changed_fields(prev.config, run_.config) or ["inputs (the tokenizer artifact was re-run)"]
        return "error", (f"{out} holds a finished pretraining run with a different config ({'; '.join(changes)}); "
                         f"pass force=True (--force) to overwrite it, or choose another --out")
    resume = run_.resumable()
    has_ckpt = latest_checkpoint(out / "checkpoints") is not None
    if prev is not None and prev.status != "done" and not resume and has_ckpt:
        changes = changed_fields(prev.config, run_.config)
        if any(c.split(":")[0] in SHAPE_FIELDS for c in changes) or not changes:
            console.print(f"[yellow]  the unfinished run in {out} has another model shape or input "
                          f"({'; '.join(changes) or 'tokenizer artifact re-run'}): starting afresh[/]")
        else:
            console.print(f"[yellow]  warning: resuming with a changed config: {'; '.join(changes)}[/]")
            resume = True
    run_.resumes = prev.run_id if resume and prev is not None and prev.status != "done" else None
    if not resume:  # a fresh run starts from an empty folder
        core.clear_stale(out)
    return "train", (run_, resume)


def _plan_or_skip(config: Config, out: Path, force: bool):
    """``_plan`` for ``core.run_stage``: the ``StageRun`` to record, None to skip; a refusal raises ``ConfigError``."""
    action, detail = _plan(config, out, force)
    if action == "error":
        raise ConfigError(detail)
    return detail[0] if action == "train" else None


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    """Train (or resume, or skip when up to date) into ``out_dir``; under torchrun every rank calls this."""
    out = Path(out_dir)
    return core.run_stage(out, config.device, lambda: _plan_or_skip(config, out, force),
                          lambda world: train(config, out, world))


def train(cfg: Config, out: Path, world: World = World()) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = world.device
    tok_dir = Path(cfg.tokenizer)
    index = read_index(tok_dir / "tokens")
    sources = load_sources(tok_dir / "tokens", "train")
    train_tokens = sources[0][2] if len(sources) == 1 else None
    val_tokens = load_split(tok_dir / "tokens", "val")
    weights = cfg.mixture_weights or [w for _, w, _ in sources]
    for field, w in (("mixture_weights", cfg.mixture_weights), ("mixture_weights_end", cfg.mixture_weights_end)):
        if w and len(w) != len(sources):
            raise ConfigError(f"{field}: {len(w)} weights given but {tok_dir} holds {len(sources)} sources "
                              f"({', '.join(n for n, _, _ in sources)})")
    if cfg.batch_size % world.world_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not a multiple of the {world.world_size} processes")

    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = load_initial_model(cfg.init_from, tok_dir, index["vocab_size"], cfg.seq_len)
        mcfg = model.config
    else:
        mcfg = model_config(cfg, index["vocab_size"], index["eos_id"])
        model = Llama(mcfg)
        model.init_weights(seed=cfg.seed)
    model.to(device).train()
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    dtype_name, why = resolve_dtype(cfg.dtype, device)
    if why and world.is_main:
        console.print(f"  dtype {dtype_name} ({why})")
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    # FSDP shards the model in place and before the optimizer exists (its parameters become DTensor shards)
    sharded = cfg.parallel == "fsdp" and world.distributed
    if cfg.parallel == "fsdp" and world.is_main and not world.distributed:
        console.print("  parallel=fsdp in a single process: training unsharded")
    param_dtype = distributed.fsdp_param_dtype(world, cfg.parallel, dtype)  # bf16 GPU FSDP: replaces autocast
    if cfg.compile and device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        cfg = cfg.model_copy(update={"compile": False})  # inductor generates C++ on CPU
        if world.is_main:
            console.print("[yellow]  compile: no C++ compiler on this machine (torch.compile needs one on CPU); "
                          "training eagerly[/]")
    if cfg.compile and sharded:
        for layer in model.model.layers:  # per layer, before sharding (torchtitan's order)
            layer.compile()
    compile_step = cfg.compile and not world.distributed  # one graph for model + loss
    forward = torch.compile(model) if cfg.compile and not sharded and not compile_step else model
    ddp = distributed.parallelize(forward, world, cfg.parallel, param_dtype, cfg.fsdp_reshard_after_forward)
    opt = make_optimizer(model, cfg)
    autocast = dtype != torch.float32 and param_dtype is None
    fused_loss = cfg.fused_loss and not sharded  # under FSDP lm_head.weight is a shard outside the wrapped forward
    if cfg.fused_loss and sharded and world.is_main:
        console.print("  fsdp: the loss uses full logits (the chunked fused loss needs the unsharded head)")

    def micro_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if fused_loss:
            return linear_cross_entropy(ddp(x, return_hidden=True), model.lm_head.weight, y)
        logits = ddp(x)
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    if compile_step:
        micro_loss = torch.compile(micro_loss)

    step = 0
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        step = state["step"]
        if world.is_main:
            console.print(f"  resumed from {ckpt} (step {step})")

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum  # global, over all ranks
    flops_token = flops_per_token(mcfg, cfg.seq_len)
    peak, device_name = peak_flops(device, dtype_name)
    peak *= world.world_size
    if world.is_main:
        console.print(f"  model: {n_params / 1e6:.2f}M parameters, {mcfg.num_hidden_layers} layers x "
                      f"{mcfg.hidden_size}; {sum(len(t) for _, _, t in sources):,} train tokens in {len(sources)} "
                      f"source(s), {tokens_per_step:,} tokens/step, {cfg.max_steps} steps on {world.world_size} x "
                      f"{device_name}" + (" (FSDP)" if sharded else ""))

    def step_batch(at_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row an optimizer step trains on (``batch_size x grad_accum``, all ranks together)."""
        rows = cfg.batch_size * cfg.grad_accum
        if train_tokens is not None:
            return sample_batch(train_tokens, rows, cfg.seq_len, cfg.seed, at_step)
        w = mixture_weights_at(at_step, cfg.max_steps, weights, cfg.mixture_weights_end or None)
        x, y, _ = sample_mixture_batch([t for _, _, t in sources], w, rows, cfg.seq_len, cfg.seed, at_step)
        return x, y

    last_loss = float("nan")
    val_loss = float("nan")
    t_start = time.time()
    tokens_seen = 0
    logger = core.MetricsLog(out, world, cfg.tensorboard and world.is_main, step)

    def micro_step_loss(micro: tuple[int, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # W processes train on the rows that one process with grad_accum=W puts in each micro-batch, so the two are
        # bit-identical for power-of-two W (the 1/W and 1/A scalings are exact)
        m, xs, ys = micro
        x, y = (distributed.micro_rows(t, world, m, cfg.grad_accum).to(device) for t in (xs, ys))
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = micro_loss(x, y)
        return loss / cfg.grad_accum

    try:
        with core.bar_for(world) as bar:
            task = bar.add_task("pretraining", total=cfg.max_steps, completed=step, rate="")
            while step < cfg.max_steps:
                lr = core.set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio,
                                            cfg.schedule, cfg.decay_fraction))
                xs, ys = step_batch(step)
                result = core.step(opt, model.parameters(), [(m, xs, ys) for m in range(cfg.grad_accum)],
                                   micro_step_loss, grad_clip=cfg.grad_clip, at_step=step, world=world, ddp=ddp,
                                   hint=f"lower the learning rate (lr={cfg.lr}) or check the data")
                loss_sum, grad_norm = result.loss, result.grad_norm
                step += 1
                tokens_seen += tokens_per_step
                last_loss = loss_sum
                elapsed = time.time() - t_start
                tps = tokens_seen / max(elapsed, 1e-9)
                rec = {"step": step, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                       "tokens": step * tokens_per_step, "tokens_per_s": round(tps),
                       "mfu": round(mfu(tps, flops_token, peak), 5)}
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    # every rank runs it (under FSDP the forward is a collective); each gets the same value
                    val_loss = validation_loss(model, val_tokens, cfg.seq_len, cfg.eval_windows,
                                               dtype if autocast else torch.float32, device)
                    rec["val_loss"] = round(val_loss, 5)
                logger.log(rec)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:  # every rank gathers, rank 0 writes
                    save_checkpoint(out / "checkpoints", step, model, opt, {"seed": cfg.seed},
                                    keep=cfg.keep_checkpoints, world=world)
                bar.update(task, completed=step, rate=f"loss {loss_sum:.3f} " + rate_text(tokens_seen, elapsed, "tok"))
    finally:
        logger.close()

    train_seconds = time.time() - t_start
    tps = tokens_seen / max(train_seconds, 1e-9)
    final = model
    if sharded:  # gather the shards (every rank) into an unsharded copy on rank 0
        full_sd = distributed.full_model_state_dict(model)
        if world.is_main:
            final = Llama(mcfg)
            final.load_state_dict(full_sd)
    if world.is_main:
        save_model(final.eval(), out)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).exists():
                shutil.copy(tok_dir / name, out / name)
        plot_loss(logger.path, out / "loss.png", title=f"pretraining ({n_params / 1e6:.2f}M params)")
    return {
        "params": n_params,
        "steps": step,
        "tokens_trained": step * tokens_per_step,
        "final_train_loss": round(last_loss, 4),
        "final_val_loss": round(val_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(tps),
        "mfu": round(mfu(tps, flops_token, peak), 5),
        "world_size": world.world_size,
        "device": device_name,
        "dtype": dtype_name,
    }
