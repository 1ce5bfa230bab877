"""The SFT stage: supervised fine-tuning of a model folder on chat JSONL, fully or with LoRA adapters.

Conversations are rendered with the model's chat template and trained with the loss on assistant tokens only (see
``chat_data``).  With ``pack`` (the default) short conversations share a row of ``seq_len`` tokens: ``segment_ids``
keep attention inside each conversation and restart positions, so a packed batch gives every conversation exactly the
loss it has alone (``tests/test_align.py`` checks it).  The loop reuses the pretraining machinery: AdamW with decay
groups, warmup + cosine (``train/schedule.py``), gradient accumulation and clipping, ``metrics.jsonl`` + ``loss.png``,
and atomic checkpoints from which a crashed run resumes exactly (batches are a pure function of seed and step).

Full fine-tuning writes an HF model folder (weights + tokenizer files); LoRA writes an adapter folder (``lora.py``)
that ``lmforge merge`` turns into a model folder.  Checkpoints hold only the trainable tensors (the adapters, for LoRA).

Data parallel: ``torchrun --nproc_per_node N -m lmforge.cli sft ...`` runs DDP over gloo, like
pretraining (``train/distributed.py``).  Every rank builds the same global batch of the step and trains on its rows
``rank::N``; each rank's loss is its token-loss sum over the *global* count of target tokens, times N to undo DDP's
gradient averaging, so the update equals a single process's although the ranks hold different numbers of target
tokens.  Only rank 0 writes files (manifest, metrics, checkpoints, samples, model).  LoRA (and the int8 base) work the
same way: DDP synchronises only the trainable adapter tensors.  With ``lora_dropout`` > 0 each rank draws its own
dropout masks, so such a run is not bit-comparable with a single process (it is still a correct run).
``parallel: fsdp`` shards full fine-tuning with FSDP2 instead (``train/distributed.py``); then the held-out loss runs on
every rank (the sharded forward is a collective) and checkpoints and the model are gathered unsharded for rank 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from lmforge.align.chat_data import (IGNORE, Batch, ChatTokenizer, DataStats, Example, collate, encode_file,  # noqa: F401
                                     pad_id_of)
from lmforge.align.lora import (DEFAULT_TARGETS, FULL_HELP, LORA_R_HELP, TOKENIZER_FILES, add_lora,
                                check_lora_rank, mode_line, save_adapter, trainable_share)
from lmforge.align.qlora import model_state_bytes
from lmforge.artifacts import Manifest, write_json
from lmforge.hardware import resolve_dtype
from lmforge.config import ConfigError, StageConfig
from lmforge.model.hf import load_model, save_model
from lmforge.progress import console, rate_text
from lmforge.stages import begin
from lmforge.train import core, distributed
from lmforge.train.distributed import World
from lmforge.train.core import checkpointing_on, peak_rss_mb
from lmforge.train.loss import head_weight, linear_cross_entropy, logit_softcap
from lmforge.train.plots import plot_loss
from lmforge.train.core import lr_at

STAGE = "sft"
VERSION = "1"


class Config(StageConfig):
    """Supervised fine-tuning of a model folder on chat JSONL (OpenAI messages or Alpaca records)."""

    model: str = Field(description="Model folder to start from (HF layout with tokenizer files).")
    data: str = Field(description="Chat JSONL: OpenAI {'messages': [...]} or Alpaca {instruction, input, output}.")
    val_data: str | None = Field(None, description="Held-out chat JSONL; default: a val_fraction split of data.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of data held out when val_data is not given.")
    mask: Literal["assistant", "last", "all"] = Field("assistant", description="Tokens that carry loss.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad or over-long records: error or counted skip.")
    seq_len: int = Field(512, ge=8, description="Tokens per row (and the longest conversation kept).")
    pack: bool = Field(True, description="Pack several conversations per row (no cross-attention between them).")
    batch_size: int = Field(8, ge=1, description="Rows per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables).")
    eval_every: int = Field(50, ge=1, description="Steps between held-out loss measurements.")
    keep_best: bool = Field(False, description="Save the weights of the measurement with the lowest held-out loss "
                                               "(every eval_every steps and the last) instead of the last step's.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    full: bool | None = Field(None, description=FULL_HELP)
    lora_r: int | None = Field(None, validate_default=True, description=LORA_R_HELP)
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha/r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                    description="Linear layers (name suffixes) that get adapters.")
    quantize_base: Literal["none", "int8"] = Field(
        "none", description="QLoRA-style: store the frozen base linears as int8 (needs --lora-r; see qlora.py).")
    sample_prompts: list[str] = Field(default_factory=list,
                                      description="User questions answered greedily before and after training "
                                                  "(written to samples.json and the metrics).")
    sample_max_tokens: int = Field(40, ge=1, description="New tokens per sample answer.")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Autocast dtype for the forward pass; auto: bfloat16 where the GPU or CPU computes it "
                               "natively (AVX-512-BF16/AMX), else float32 (emulated bf16 is slower).")
    activation_checkpointing: bool | None = Field(
        None, description="Recompute each decoder layer's activations in the backward pass: much less memory, ~1/3 "
                          "more compute; default on with --lora-r (activations dominate: 7.1 → 3.3 GB for SmolLM2 "
                          "LoRA, docs/benchmarks.md), off with --full (weights and optimizer state dominate).")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp, or fsdp (FSDP2 sharding; full "
                                                                "fine-tuning only).")
    fsdp_reshard_after_forward: bool = Field(True, description="fsdp: free each layer's gathered parameters after "
                                                               "its forward.")
    seed: int = Field(1337, description="Seed for the data order and LoRA init.")

    @field_validator("lora_r")
    @classmethod
    def _explicit_mode(cls, v: int | None, info: ValidationInfo) -> int | None:
        return check_lora_rank(v, info.data.get("full"))

    @model_validator(mode="after")
    def _best_needs_held_out(self) -> "Config":
        if self.keep_best and self.val_fraction == 0 and not self.val_data:
            raise ValueError("keep_best needs held-out data (val_data, or val_fraction > 0)")
        if self.keep_best and self.parallel == "fsdp":
            raise ValueError("keep_best is not supported with parallel=fsdp (the best weights would be shards)")
        return self


class BestWeights:
    """The trainable tensors at the lowest held-out loss so far, kept on disk (``best/trainable.safetensors`` + its
    step and loss in ``best/state.json``) so that a resumed run still knows them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        state = root / "state.json"
        info = json.loads(state.read_text()) if state.exists() else {}
        self.step: int | None = info.get("step")
        self.loss: float = info.get("val_loss", float("inf"))

    def offer(self, step: int, val_loss: float, model: nn.Module) -> None:
        """Keep the model's trainable tensors if ``val_loss`` is the lowest so far (ties keep the earlier step)."""
        if not val_loss < self.loss:
            return
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "trainable.safetensors.tmp"
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(tmp))
        tmp.replace(self.root / "trainable.safetensors")
        write_json(self.root / "state.json", {"step": step, "val_loss": val_loss})
        self.step, self.loss = step, val_loss

    def restore(self, model: nn.Module) -> None:
        """Put the kept tensors back into ``model``."""
        from safetensors.torch import load_file

        kept = load_file(str(self.root / "trainable.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in kept.items():
                params[name].copy_(t)


# ----------------------------------------------------------------------------------------------------------------------
# batches


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy, order-keeping packing: indices of consecutive examples that fit together in ``seq_len`` tokens."""
    rows: list[list[int]] = []
    used = seq_len + 1
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len {seq_len}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


class BatchPlan:
    """Batch ``b`` of a run is a pure function of (seed, b): epochs are seeded permutations of the examples, packed
    into rows in that order; so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, packed: bool, seed: int) -> None:
        self.examples, self.batch_size, self.seq_len, self.packed, self.seed = examples, batch_size, seq_len, packed, seed
        self._epochs: list[list[list[int]]] = []

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            order = np.random.default_rng([self.seed, len(self._epochs)]).permutation(len(self.examples)).tolist()
            if self.packed:
                rows = pack_rows([len(self.examples[i].input_ids) for i in order], self.seq_len)
                rows = [[order[j] for j in row] for row in rows]
            else:
                rows = [[i] for i in order]
            self._epochs.append(rows)
        return self._epochs[epoch]

    def rows(self, b: int) -> list[list[int]]:
        out: list[list[int]] = []
        start, epoch = b * self.batch_size, 0
        while len(out) < self.batch_size:  # walk the concatenated row stream of all epochs
            rows = self._epoch_rows(epoch)
            if start < len(rows):
                take = rows[start:start + self.batch_size - len(out)]
                out.extend(take)
                start = 0
            else:
                start -= len(rows)
            epoch += 1
        return out

    def batch(self, b: int, pad_id: int) -> Batch:
        return collate(self.examples, self.rows(b), pad_id, self.packed, self.seq_len if self.packed else None)


def shard_batch(batch: Batch, world: World) -> Batch:
    """This rank's rows ``rank::world_size`` of a global batch (the whole batch in a single process)."""
    if not world.distributed:
        return batch
    segs = batch.segment_ids
    return Batch(distributed.shard_rows(batch.input_ids, world), distributed.shard_rows(batch.labels, world),
                 distributed.shard_rows(segs, world) if segs is not None else None)


# ----------------------------------------------------------------------------------------------------------------------
# losses


def token_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token cross-entropy [B, T] (0 where the label is ignored)."""
    logits = model(batch.input_ids, segment_ids=batch.segment_ids)
    ce = F.cross_entropy(logits.float().transpose(1, 2), batch.labels.clamp(min=0), reduction="none")
    return ce * (batch.labels != IGNORE)


def target_loss_sum(forward: nn.Module, head: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of the target tokens, through the chunked fused head + loss (``linear_cross_entropy``):
    only target tokens meet the head and no [B, T, vocab] logits exist.  ``forward`` is the model (or its DDP
    wrapper), ``head`` its ``lm_head.weight``; equals ``token_losses(forward, batch).sum()``."""
    if logit_softcap(forward):
        return token_losses(forward, batch).sum()
    mask = batch.labels != IGNORE
    hidden = forward(batch.input_ids, segment_ids=batch.segment_ids, return_hidden=True)
    n = int(mask.sum())
    if n == 0:  # a data-parallel shard without targets: zero loss, every parameter still in the graph
        return (hidden.sum() + head.sum()) * 0.0
    return linear_cross_entropy(hidden[mask], head, batch.labels[mask]) * n


@torch.no_grad()
def assistant_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8,
                   fused: bool = True) -> float:
    """Mean cross-entropy per target token over ``examples`` (each alone in its row); ``fused``: through the chunked
    head (``target_loss_sum``), else full logits (a sharded FSDP model, whose head is a shard)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples, [[i] for i in range(s, min(s + batch_size, len(examples)))], pad_id, packed=False)
        total += float(target_loss_sum(model, head_weight(model), batch) if fused else token_losses(model, batch).sum())
        count += batch.n_targets
    model.train(was_training)
    return total / max(count, 1)


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = np.random.default_rng([seed, 999]).permutation(len(examples))
    n_val = max(1, int(round(len(examples) * fraction)))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


# ----------------------------------------------------------------------------------------------------------------------
# the stage


def check_world(config: Config, world: World) -> None:
    """Data-parallel SFT needs a global batch that splits evenly over the processes; FSDP shards full fine-tuning."""
    if config.parallel == "fsdp" and config.lora_r:
        raise ConfigError("parallel: fsdp shards full fine-tuning; LoRA trains small adapters over a frozen base, "
                          "use parallel: ddp (or full: true)")
    if world.distributed and config.batch_size % world.world_size:
        raise ConfigError(f"batch_size: {config.batch_size} is not a multiple of the {world.world_size} processes")


def _plan(config: Config, out: Path, force: bool):
    """Rank 0 decides: the ``StageRun`` to train in (stale files of a fresh run removed), or None to skip."""
    inputs = {"model": config.model, "data": config.data}
    if config.val_data:
        inputs["val_data"] = config.val_data
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force, force_resumes=True)
    if run_ is not None and run_.resumes is None:
        core.clear_stale(out, ("checkpoints", "metrics.jsonl"))
    return run_


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    """Train (or resume, or skip when up to date) into ``out_dir``; under torchrun every rank calls this."""
    out = Path(out_dir)
    return core.run_stage(out, "cpu", lambda: _plan(config, out, force), lambda world: train(config, out, world),
                          check=lambda world: check_world(config, world))


def load_examples(cfg: Config, tok: ChatTokenizer,
                  report: bool = True) -> tuple[list[Example], list[Example], dict[str, DataStats]]:
    """Train and held-out examples, and what reading each file kept and skipped (``{"data": ..., "val_data": ...}``);
    with ``report`` the skips are printed (how many, per reason, the first few file:line)."""
    stats = {"data": DataStats()}
    examples = encode_file(tok, cfg.data, cfg.seq_len, cfg.mask, cfg.on_error, stats["data"])
    if cfg.val_data:
        stats["val_data"] = DataStats()
        train_ex, val_ex = examples, encode_file(tok, cfg.val_data, cfg.seq_len, cfg.mask, cfg.on_error,
                                                 stats["val_data"])
    else:
        train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    if report:
        for key, st in stats.items():
            st.report("conversations", getattr(cfg, key))
    if not train_ex:
        why = stats["data"].summary("conversations", cfg.data) or f"{stats['data'].lines} records"
        raise ValueError(f"{cfg.data}: no usable training conversation ({why})")
    return train_ex, val_ex, stats


@torch.no_grad()
def answer_samples(model: nn.Module, tok: ChatTokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` (a ``Llama``, or a peft model around one) to each user prompt, via the chat template."""
    from lmforge.model.generate import generate
    from lmforge.serve.engine import END_OF_TURN_TOKENS

    llama = model.get_base_model() if hasattr(model, "get_base_model") else model
    was = llama.training
    llama.eval()
    stop = tok.tokenizer.token_to_id(tok.special.get("eos_token") or "") if tok.special.get("eos_token") else None
    end_turn = next((i for t in END_OF_TURN_TOKENS if (i := tok.tokenizer.token_to_id(t)) is not None), None)
    answers = []
    for prompt in prompts:
        ids = tok.encode(tok.render([{"role": "user", "content": prompt}], add_generation_prompt=True))
        new = generate(llama, ids, max_new_tokens, eos_token_id=end_turn if end_turn is not None else stop)
        answers.append(tok.decode(new).strip())
    llama.train(was)
    return answers


def train(cfg: Config, out: Path, world: World = World()) -> dict:
    if cfg.quantize_base != "none" and not cfg.lora_r:
        raise ValueError("quantize_base needs LoRA (--lora-r R): a quantised base cannot be fully fine-tuned")
    check_world(cfg, world)
    main = world.is_main
    if main:
        console.print(f"  {mode_line(cfg.full, cfg.lora_r)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = Path(cfg.model)
    tok = ChatTokenizer.from_folder(model_dir)
    train_ex, val_ex, stats = load_examples(cfg, tok, report=main)
    pad_id = pad_id_of(model_dir, tok)
    torch.manual_seed(cfg.seed)
    base = load_model(model_dir)
    if cfg.seq_len > base.config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context {base.config.max_position_embeddings}")
    model: nn.Module = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) \
        if cfg.lora_r else base
    if checkpointing_on(cfg):
        from lmforge.train.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(base)
    share = trainable_share(model)
    quant: dict[str, int] = {}
    if cfg.quantize_base == "int8":
        from lmforge.align.qlora import quantize_frozen_base

        quant = quantize_frozen_base(model)
    model.train()
    samples_path = out / "samples.json"
    samples = json.loads(samples_path.read_text()) if main and samples_path.exists() else []
    if main and cfg.sample_prompts and [s["prompt"] for s in samples] != cfg.sample_prompts:
        before = answer_samples(model, tok, cfg.sample_prompts, cfg.sample_max_tokens)
        samples = [{"prompt": p, "before": a} for p, a in zip(cfg.sample_prompts, before)]
        write_json(samples_path, samples)
    dtype_name, why = resolve_dtype(cfg.dtype, torch.device("cpu"))
    if main and why:
        console.print(f"  dtype {dtype_name} ({why})")
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    plan = BatchPlan(train_ex, cfg.batch_size, cfg.seq_len, cfg.pack, cfg.seed)

    ckpts = core.TrainableCheckpoints(out / "checkpoints", cfg.keep_checkpoints, world)
    val_before = assistant_loss(model, val_ex, pad_id) if main and val_ex and not ckpts.exists() else float("nan")
    # FSDP shards the model in place, before the optimizer exists; DDP wraps it; a single process keeps it as it is
    sharded = cfg.parallel == "fsdp" and world.distributed
    if cfg.parallel == "fsdp" and main and not world.distributed:
        console.print("  parallel=fsdp in a single process: training unsharded")
    ddp = distributed.parallelize(model, world, cfg.parallel, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    opt = core.make_optimizer(model, cfg.lr, cfg.weight_decay)
    head = None if sharded else head_weight(model)  # under FSDP the head is a shard: the loss uses full logits
    step, _ = ckpts.load(model, opt)
    if main:
        console.print(f"  {len(train_ex)} train / {len(val_ex)} held-out conversations; "
                      f"{share['trainable_params'] / 1e6:.3f}M of {share['total_params'] / 1e6:.2f}M parameters trained "
                      f"({100 * share['trainable_share']:.2f}%)" + ("; LoRA r=%d" % cfg.lora_r if cfg.lora_r else "")
                      + (f"; {'FSDP' if sharded else 'DDP'} over {world.world_size} processes"
                         if world.distributed else ""))

    val_loss, last_loss, tokens_seen, targets_seen = val_before, float("nan"), 0, 0
    if step == 0:  # a fresh start: an earlier run's best weights are not this run's
        shutil.rmtree(out / "best", ignore_errors=True)
    best = BestWeights(out / "best") if cfg.keep_best and main else None
    t_start = time.time()
    with core.MetricsLog(out, world, resume_step=step) as log, core.bar_for(world) as bar:
        task = bar.add_task("sft", total=cfg.max_steps, completed=step, rate="")
        while step < cfg.max_steps:
            lr = core.set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            batches = [plan.batch(step * cfg.grad_accum + m, pad_id) for m in range(cfg.grad_accum)]
            # every rank holds the whole global batch, so this is the global count of target tokens of the step
            n_targets = max(1, sum(b.n_targets for b in batches))
            for batch in batches:
                tokens_seen += int((batch.input_ids != pad_id).sum()) if batch.segment_ids is None \
                    else int((batch.segment_ids > 0).sum())

            def micro_loss(batch: Batch) -> torch.Tensor:  # mean over every target token of the step
                mine = shard_batch(batch, world)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    # x world size: DDP and FSDP average the ranks' gradients, the sum is wanted
                    summed = token_losses(ddp, mine).sum() if sharded else target_loss_sum(ddp, head, mine)
                    return summed / n_targets * world.world_size

            result = core.step(opt, model.parameters(), batches, micro_loss, grad_clip=cfg.grad_clip, at_step=step,
                               world=world, ddp=ddp, hint=f"lower the learning rate (lr={cfg.lr})")
            loss_sum, grad_norm = result.loss, result.grad_norm
            targets_seen += n_targets
            step += 1
            last_loss = loss_sum
            elapsed = time.time() - t_start
            rec = {"step": step, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                   "target_tokens": n_targets, "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9))}
            # under FSDP every rank runs the held-out forward (a collective)
            if (main or sharded) and val_ex and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val_loss = assistant_loss(model, val_ex, pad_id, fused=not sharded)
                rec["val_loss"] = round(val_loss, 5)
                if best is not None:
                    best.offer(step, val_loss, model)
            log.log(rec)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                ckpts.save(step, model, opt)
            bar.update(task, completed=step, rate=f"loss {loss_sum:.3f} " + rate_text(tokens_seen, elapsed, "tok"))
    seconds = time.time() - t_start
    opt.state.clear()  # AdamW state (2 x the trainable weights) is not needed to save the model: free it first

    model.eval()
    if sharded:  # gather the shards (every rank) into an unsharded copy on rank 0
        full_sd = distributed.full_model_state_dict(model)
        if main:
            model = load_model(model_dir)
            model.load_state_dict(full_sd)
    if not main:  # other ranks only train
        return {"steps": step, "world_size": world.world_size}
    last_val_loss = val_loss
    if best is not None and best.step is not None and best.step != step:
        best.restore(model)  # the saved model (and the samples) are the best step's
        val_loss = best.loss
        console.print(f"  keep_best: the weights of step {best.step} (held-out loss {best.loss:.4f}; the last step's "
                      f"{last_val_loss:.4f})")
    if samples:
        for s, a in zip(samples, answer_samples(model, tok, cfg.sample_prompts, cfg.sample_max_tokens)):
            s["after"] = a
        write_json(samples_path, samples)
    if cfg.lora_r:
        save_adapter(model, out, model_dir)
    else:
        save_model(model, out)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    plot_loss(out / "metrics.jsonl", out / "loss.png", title="SFT" + (f" (LoRA r={cfg.lora_r})" if cfg.lora_r else ""))
    return {
        "mode": "lora" if cfg.lora_r else "full",
        "activation_checkpointing": checkpointing_on(cfg),
        **share,
        "steps": step,
        "train_conversations": len(train_ex),
        "val_conversations": len(val_ex),
        **{key: st.as_dict() for key, st in stats.items()},  # "data" (and "val_data"): kept, skipped per reason
        "val_loss_before": round(val_before, 4) if math.isfinite(val_before) else None,
        "final_val_loss": round(val_loss, 4) if math.isfinite(val_loss) else None,  # of the saved weights
        **({"best_step": best.step, "last_val_loss": round(last_val_loss, 4) if math.isfinite(last_val_loss) else None}
           if best is not None else {}),
        "final_train_loss": round(last_loss, 4),
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round(tokens_seen / max(seconds, 1e-9)),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "dtype": dtype_name,
        "model_state_mb": round(model_state_bytes(model) / 2**20, 1),
        "world_size": world.world_size,
        **({"quantize_base": cfg.quantize_base, **quant} if quant else {}),
        **({"samples": samples} if samples else {}),
    }
