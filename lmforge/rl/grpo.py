"""GRPO: reinforcement learning with verifiable rewards, rollouts on lmforge's own serving engine in the same process.

One step:

1. **Rollouts.**  ``prompts_per_step`` task prompts, ``group_size`` (G) completions each, sampled by the serving
   ``Engine`` of this process (continuous batching; the G copies of a prompt reuse its cached keys/values).  Every
   request has its own seed, a pure function of (seed, step, row): the engine seed is part of the run's state.
2. **Rewards** (``rewards.Reward``): a weighted sum of components.  A component that raises or returns None/NaN gives
   its sample reward 0 (counted, warned once); a group whose samples all failed is skipped and counted.
3. **Advantages**, group-normalised: ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)`` (``scale_rewards:
   false`` drops the division, as Dr. GRPO does).  Groups whose rewards are all equal carry no signal (A = 0).
4. **Reference log-probs** of the sampled tokens, once per batch, without gradients: the frozen start model (with
   LoRA: the same model with the adapters switched off, no second copy) or ``ref_model``.
5. **Policy update**, ``iterations`` optimiser steps on the batch (1 by default, then the importance ratio is 1 and
   the clipped objective is the plain policy gradient; with more, the log-probs before the first step are the
   "old" policy's).  Per token: ``-min(ρ A, clip(ρ, 1-ε, 1+ε_high) A) + β k3``, with ``ρ = π/π_old`` and the k3 KL
   estimator ``k3 = exp(ref - logπ) - (ref - logπ) - 1`` (Schulman; always >= 0, unbiased for KL(π||ref)).
   **Rollouts at another precision** (``rollout_dtype: bfloat16``, ``rollout_quantize: int8|int4``, cheaper to
   sample on a CPU) come from a slightly different policy than the float32 one being trained, so each token's loss is
   weighted by the truncated importance ratio ``min(π_train(t) / π_rollout(t), rollout_is_cap)`` with the engine's
   log-prob of the sampled token (truncated importance sampling, as TRL and verl apply to vLLM rollouts; Yao et al.
   2025).  ``rollout_is_mean`` and ``rollout_is_capped`` in the metrics say how far the two policies are apart.
6. **Weight sync**: the policy's current weights (LoRA merged in) are copied into the engine's serving tensors in
   place (``Engine.update_weights``; no disk; with LoRA only the adapted layers) before the next rollout, and the
   engine's prefix cache is reset.

Loss normalisation (``loss_type``):

* ``dapo`` (default): the sum of per-token losses over the batch divided by the number of completion tokens in it
  (DAPO, Yu et al. 2025).  Every token weighs the same, so long answers are not down-weighted per token, and, unlike
  ``dr_grpo``, the scale does not depend on ``max_tokens``.  TRL's default too.
* ``grpo``: mean over each completion's tokens, then mean over completions (Shao et al. 2024): a token of a short
  completion weighs more, which favours short right answers and long wrong ones (the length bias Dr. GRPO points out).
* ``dr_grpo``: the sum over tokens divided by (completions x ``max_tokens``), a constant (Liu et al. 2025); pair it
  with ``scale_rewards: false`` for the paper's setting.

The optimiser, schedule, backward / finite-loss check / clipping step, ``metrics.jsonl`` + TensorBoard and the
checkpoints are the shared training core's (``lmforge.train.core``); this module keeps rollouts, rewards and the loss.

Under torchrun (DDP) each process rolls out a contiguous share of the step's groups on its own engine; the loss is
normalised by the whole step's tokens (or completions) and DDP sums the gradients, so N processes make the one-process
update (``train``'s docstring; ``tests/test_rl_grpo_ddp.py``).

Resume: a checkpoint holds the trainable tensors, the optimiser state and torch's RNG; the prompts of a step and the
sampling seeds are pure functions of (seed, step), and the engine is re-synced from the restored policy, so a run
killed with SIGKILL and resumed produces the same weights as one that was never interrupted (a test checks it).

Metrics (``metrics.jsonl``, TensorBoard under ``tensorboard/``, ``reward.png``): ``reward`` (mean/std, and per
component), ``val_reward`` (greedy, on the held-out split, every ``eval_every`` steps and before training), ``kl``,
``clip_fraction``, ``completion_len``, ``entropy``, ``loss``, ``grad_norm``, timing (``rollout_s``, ``ref_s``,
``train_s``, ``rollout_tokens_per_s``), skipped groups and reward failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from lmforge.align.lora import (DEFAULT_TARGETS, FULL_HELP, LORA_R_HELP, TOKENIZER_FILES, add_lora, check_lora_rank,
                                mode_line, save_adapter, trainable_share)
from lmforge.artifacts import Manifest, write_json
from lmforge.config import ConfigError, StageConfig
from lmforge.model.hf import load_model, save_model
from lmforge.model.prefix_groups import PrefixGroups
from lmforge.progress import console
from lmforge.rl import tasks as T
from lmforge.rl.rewards import Reward
from lmforge.stages import begin, finished
from lmforge.train import core, distributed
from lmforge.train.distributed import World
from lmforge.train.loss import head_weight

STAGE = "grpo"
VERSION = "1"


class GRPOError(ValueError):
    """A GRPO run that cannot start as configured (the message says why and what to change)."""


class Config(StageConfig):
    """GRPO (group relative policy optimisation) with verifiable rewards; rollouts on lmforge's engine."""

    model: str = Field(description="Model folder to train (HF layout with tokenizer files).")
    task: str = Field(description="Built-in task (arithmetic, countdown, json_format) or a JSONL task file.")
    reward: str | None = Field(None, description="Reward spec: name[:weight],... or module:function[:weight]; "
                                                 "default: the built-in task's.")
    test_file: str | None = Field(None, description="Held-out JSONL task file (a task file's default: a split).")
    train_size: int = Field(2000, ge=1, description="Built-in task: generated training prompts.")
    test_size: int = Field(64, ge=0, description="Held-out prompts scored greedily (val_reward).")
    ref_model: str | None = Field(None, description="Frozen reference model folder for the KL term (default: the "
                                                    "start model).")
    group_size: int = Field(8, description="G: completions per prompt (>= 2).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per optimiser step (batch = prompts x G).")
    max_steps: int = Field(100, ge=1, description="Optimiser steps (one rollout batch each).")
    iterations: int = Field(1, ge=1, description="Optimiser steps per rollout batch (GRPO's mu).")
    max_tokens: int = Field(64, ge=1, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus sampling.")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field("dapo", description="Loss normalisation (module docs).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std (false: Dr. GRPO).")
    beta: float = Field(0.04, ge=0, description="KL penalty weight (k3 estimator; 0 skips the reference).")
    epsilon: float = Field(0.2, gt=0, description="Lower clip range of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range (default: epsilon; DAPO uses 0.28).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables).")
    full: bool | None = Field(None, description=FULL_HELP)
    lora_r: int | None = Field(None, validate_default=True, description=LORA_R_HELP)
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description="LoRA target layers.")
    rollout_dtype: Literal["float32", "bfloat16"] = Field("float32", description="Serving weights for rollouts.")
    rollout_quantize: Literal["none", "int8", "int4"] = Field("none", description="Rollout engine's linear weights "
                                                              "quantised (bf16 activations); the loss stays float32.")
    rollout_is_cap: float = Field(2.0, ge=0, description="With bf16/int8/int4 rollouts: cap of the per-token "
                                  "importance weight pi_train / pi_rollout (truncated IS); 0 turns the correction off.")
    max_model_len: int = Field(512, ge=16, description="Context of the rollout engine (prompt + completion).")
    eval_every: int = Field(10, ge=1, description="Steps between held-out reward measurements.")
    checkpoint_every: int = Field(10, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    samples: int = Field(4, ge=0, description="Held-out prompts whose greedy answers before/after go to samples.json.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under tensorboard/.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    seed: int = Field(0, description="Seed for the task, the prompt order and the rollout sampling.")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"GRPO needs a group of at least 2 completions per prompt to compare (advantages are "
                             f"relative to the group's mean), got group_size {v}")
        return v

    @field_validator("lora_r")
    @classmethod
    def _explicit_mode(cls, v: int | None, info: ValidationInfo) -> int | None:
        return check_lora_rank(v, info.data.get("full"))


# ----------------------------------------------------------------------------------------------------------------------
# pieces


def _seed_of(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def prompt_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """The training prompts of ``step`` (0-based): epochs of seeded permutations, a pure function of its arguments."""
    flat = range(step * per_step, (step + 1) * per_step)
    return [int(np.random.default_rng([seed, i // n]).permutation(n)[i % n]) for i in flat]


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, scale: bool) -> torch.Tensor:
    """``rewards`` [P, G] → advantages [P, G]; groups with ``valid`` false get 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    if scale:
        adv = adv / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return adv * valid[:, None]


@dataclass
class RolloutBatch:
    """A step's rollouts packed one group per row: the prompt once, then its completions one after the other, each
    completion attending to the prompt and to itself only (``mask``, computed block by block) at the positions it had
    when sampled.  The prompt is computed once per group instead of G times (the log-probs are the same up to float
    rounding)."""

    input_ids: torch.Tensor  # [groups, T], right-padded
    positions: torch.Tensor  # [groups, T]
    mask: PrefixGroups  # the layout: prompt length and completion lengths of each row
    src: torch.Tensor  # [M] flat index into [groups * T] of the hidden state that predicts each completion token
    tgt: torch.Tensor  # [M] the completion tokens, completion by completion (row-major over the completions)
    n_tokens: torch.Tensor  # [N] completion tokens per completion


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, group_size: int) -> RolloutBatch:
    """Pack ``prompts`` (one per completion, the same for each run of ``group_size``) and their ``completions``."""
    groups = []
    for g in range(0, len(prompts), group_size):
        p = prompts[g]
        ids, pos, src = list(p), list(range(len(p))), []
        for c in completions[g:g + group_size]:
            start = len(ids)
            # the first token is predicted by the prompt's last one, each next one by the token before it
            src += [len(p) - 1] + list(range(start, start + len(c) - 1)) if c else []
            ids += c
            pos += range(len(p), len(p) + len(c))
        groups.append((ids, pos, src))
    T = max(len(ids) for ids, *_ in groups)
    B = len(groups)
    ids_t = torch.full((B, T), pad_id, dtype=torch.long)
    pos_t = torch.zeros((B, T), dtype=torch.long)
    src_all = []
    for b, (ids, pos, src) in enumerate(groups):
        ids_t[b, :len(ids)] = torch.tensor(ids)
        pos_t[b, :len(pos)] = torch.tensor(pos)
        src_all += [b * T + j for j in src]
    layout = PrefixGroups([len(prompts[g]) for g in range(0, len(prompts), group_size)],
                          [[len(c) for c in completions[g:g + group_size]] for g in range(0, len(prompts), group_size)],
                          T)
    tgt = [t for c in completions for t in c]
    return RolloutBatch(ids_t, pos_t, layout, torch.tensor(src_all, dtype=torch.long),
                        torch.tensor(tgt, dtype=torch.long), torch.tensor([len(c) for c in completions]))


def token_logps(model: nn.Module, batch: RolloutBatch, with_entropy: bool = False, head: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [M] of the completion tokens (completion by completion) and, optionally, the policy's entropy there.

    Only the hidden states that predict a completion token go through the output head (``head``: the model's own by
    default; pass it when ``model`` is a DDP wrapper)."""
    hidden = model(batch.input_ids, positions=batch.positions, attention_mask=batch.mask, return_hidden=True)
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.src]
    logits = (hidden @ (head if head is not None else head_weight(model)).t()).float()
    logp_all = logits.log_softmax(-1)
    lp = logp_all.gather(1, batch.tgt[:, None]).squeeze(1)
    ent = None
    if with_entropy:
        with torch.no_grad():  # in place: one [M, vocab] buffer, not two
            ent = -logp_all.exp().mul_(logp_all).sum(-1)
    return lp, ent


def grpo_loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv_tok: torch.Tensor,
              row_of: torch.Tensor, n_rows: int, n_tokens: torch.Tensor, cfg: Config,
              total_rows: int | None = None, total_tokens: int | None = None,
              is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (times ``is_weight`` per token, the truncated importance weight of rollouts sampled at
    another precision, if given) + β·k3 per token, normalised by ``cfg.loss_type``; with its statistics.

    ``total_rows`` / ``total_tokens``: the completions and completion tokens of the whole step, over all data-parallel
    ranks (default: this batch's), so that each rank's loss is its share of the one-process loss.  The statistics
    are sums (``clipped``, ``kl_sum``, over ``tokens``), to be added up over ranks."""
    total_rows = n_rows if total_rows is None else total_rows
    total_tokens = int(n_tokens.sum()) if total_tokens is None else total_tokens
    ratio = torch.exp(logp - old)
    hi = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    clipped = ratio.clamp(1 - cfg.epsilon, 1 + hi)
    per_tok = -torch.min(ratio * adv_tok, clipped * adv_tok)
    if is_weight is not None:
        per_tok = per_tok * is_weight
    kl = None
    if ref is not None:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + cfg.beta * kl
    if cfg.loss_type == "dapo":
        loss = per_tok.sum() / max(total_tokens, 1)
    elif cfg.loss_type == "grpo":
        per_row = torch.zeros(n_rows, dtype=per_tok.dtype).index_add(0, row_of, per_tok)
        loss = (per_row / n_tokens.clamp(min=1)).sum() / total_rows
    else:  # dr_grpo
        loss = per_tok.sum() / (total_rows * cfg.max_tokens)
    with torch.no_grad():
        was_clipped = ((ratio < 1 - cfg.epsilon) & (adv_tok < 0)) | ((ratio > 1 + hi) & (adv_tok > 0))
        stats = {"clipped": float(was_clipped.sum()), "kl_sum": float(kl.sum()) if kl is not None else 0.0,
                 "tokens": float(len(ratio))}
    return loss, stats


def rollout_is_weight(old: torch.Tensor, sampled: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict]:
    """The truncated importance weight ``min(exp(old - sampled), cap)`` per token (``old``: the float32 policy's
    log-probs of the sampled tokens before the update, ``sampled``: the rollout engine's), with its statistics
    (sums, to be added up over ranks): ``is_sum`` of the untruncated ratio, ``is_capped`` tokens over the cap."""
    ratio = torch.exp(old.detach() - sampled)
    return ratio.clamp(max=cap), {"is_sum": float(ratio.sum()), "is_capped": float((ratio > cap).sum())}


def trained_weights(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The weights training can have changed, under the plain ``Llama``'s parameter names: with LoRA each adapted
    layer's weight with its adapter folded in (``W + scale * B A``, what ``merge_and_unload`` computes) and any other
    trainable tensor; in full fine-tuning every parameter (tied ones once)."""
    if not hasattr(policy, "get_base_model"):
        return {k: v.detach() for k, v in policy.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in policy.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and mod.active_adapters:
                key = name.removeprefix("base_model.model.") + ".weight"
                delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
                out[key] = mod.base_layer.weight.detach() + delta
        for name, p in policy.named_parameters():
            if p.requires_grad and "lora_" not in name:
                out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p.detach()
    return out


def sync_engine(engine, policy: nn.Module) -> None:
    """Copy the policy's current weights into the engine's serving weights (in place, no disk): only those training
    changes (with LoRA: the adapted layers, merged; the engine was loaded from the same base weights)."""
    engine.update_weights(trained_weights(policy))


def check_same_tokenizer(policy_dir: Path, ref_dir: Path) -> None:
    """A reference with a different tokenizer scores other token ids: refuse it."""
    from lmforge.tokenizer.bpe import load_tokenizer

    a, _ = load_tokenizer(policy_dir)
    b, _ = load_tokenizer(ref_dir)
    if a.get_vocab() != b.get_vocab():
        raise GRPOError(f"ref_model {ref_dir}: its tokenizer differs from the policy's ({policy_dir}): "
                        f"{a.get_vocab_size()} vs {b.get_vocab_size()} tokens, or other ids; the KL term compares "
                        f"log-probs of the same token ids, so the reference must share the policy's tokenizer")


def plot_reward(metrics_path: Path, out_png: Path, title: str) -> None:
    from lmforge.train.plots import plot_curves

    plot_curves(metrics_path, out_png, title, ("reward", "train (sampled)"), ("val_reward", "held-out (greedy)"),
                "reward")


# ----------------------------------------------------------------------------------------------------------------------
# the stage


def check_world(config: Config, world: World) -> None:
    """Under torchrun each process rolls out whole groups: the step's prompts must split evenly over the processes."""
    if world.distributed and config.prompts_per_step % world.world_size:
        raise ConfigError(f"prompts_per_step: {config.prompts_per_step} is not a multiple of the {world.world_size} "
                          f"processes (each process rolls out whole groups of group_size completions); pick a "
                          f"prompts_per_step divisible by --nproc-per-node")


def _plan(config: Config, out: Path, force: bool):
    """Rank 0 decides: the ``StageRun`` to train in (a fresh run's stale files removed), or None to skip."""
    inputs = {"model": config.model}
    if Path(config.task).exists():
        inputs["task"] = config.task
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force, force_resumes=True)
    if run_ is not None and run_.resumes is None:
        core.clear_stale(out, ("checkpoints", "metrics.jsonl", "tensorboard", "val_before.json"))
    return run_


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    """Train (or resume, or skip when up to date) into ``out_dir``; under torchrun every rank calls this."""
    out = Path(out_dir)
    return core.run_stage(out, "cpu", lambda: _plan(config, out, force), lambda world: train(config, out, world),
                          check=lambda world: check_world(config, world))


def evaluate(engine, reward: Reward, items: list[T.Item], prompts: list[list[int]], max_tokens: int
             ) -> tuple[float, list[str], dict[str, float]]:
    """Mean greedy reward over ``items`` (and the completions, and per-component means)."""
    from lmforge.serve.sampling import SamplingParams

    if not items:
        return float("nan"), [], {}
    engine.reset_prefix_cache()
    stop = list(engine.chat_stop_token_ids)
    res = engine.generate_batch(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=stop))
    scored = [reward.score(_prompt_text(it), r.text, it.fields) for it, r in zip(items, res)]
    parts = {n: float(np.mean([s.parts[n] for s in scored])) for n in reward.names}
    return float(np.mean([s.total for s in scored])), [r.text for r in res], parts


def _prompt_text(item: T.Item) -> str:
    return item.prompt if isinstance(item.prompt, str) else item.messages()[-1]["content"]


def train(cfg: Config, out: Path, world: World = World()) -> dict:
    """The GRPO loop.  Under torchrun (DDP) each rank has its own engine and rolls out its contiguous share of the
    step's prompts (whole groups: advantages never need another rank's rewards); the loss is normalised by the whole
    step's completion tokens (or rows), so N processes compute the one-process update; DDP all-reduces gradients,
    every rank syncs the new weights into its engine; rank 0 evaluates, logs and writes."""
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    check_world(cfg, world)
    main = world.is_main
    if main:
        console.print(f"  {mode_line(cfg.full, cfg.lora_r)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = Path(cfg.model)
    task = T.load(cfg.task, cfg.reward, cfg.test_file, cfg.train_size, cfg.test_size, cfg.seed)
    reward = Reward.from_spec(task.reward)
    test_items = task.test[:cfg.test_size]
    if cfg.ref_model:
        check_same_tokenizer(model_dir, Path(cfg.ref_model))
    G, P = cfg.group_size, cfg.prompts_per_step
    P_mine = P // world.world_size  # this rank's prompts of a step: [first, first + P_mine) of the step's P
    first = world.rank * P_mine

    # the rollout engine holds its own copy of the weights, synced from the policy before every rollout
    engine = Engine.from_folder(model_dir, max_num_seqs=P_mine * G, max_model_len=cfg.max_model_len,
                                dtype=cfg.rollout_dtype,
                                quantize=None if cfg.rollout_quantize == "none" else cfg.rollout_quantize)
    room = engine.max_model_len - cfg.max_tokens
    train_prompts = [engine.encode_chat(it.messages()) for it in task.train]
    test_prompts = [engine.encode_chat(it.messages()) for it in test_items]
    for split, ids in (("train", train_prompts), ("test", test_prompts)):
        for i, p in enumerate(ids):
            if len(p) > room:
                raise GRPOError(f"{cfg.task}: {split} prompt {i} is {len(p)} tokens; with max_tokens {cfg.max_tokens} "
                                f"it does not fit the context of {engine.max_model_len} (max_model_len); shorten the "
                                f"prompt, lower --max-tokens or raise --max-model-len (the model allows "
                                f"{engine.model.config.max_position_embeddings})")
    pad_id = next(iter(engine.eos_token_ids), 0)

    torch.manual_seed(cfg.seed)
    base = load_model(model_dir)
    policy: nn.Module = add_lora(base, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets) if cfg.lora_r else base
    ref_model: nn.Module | None = None
    if cfg.beta > 0 and (cfg.ref_model or not cfg.lora_r):
        ref_model = load_model(Path(cfg.ref_model or model_dir)).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    policy.train()
    share = trainable_share(policy)
    ddp = distributed.parallelize(policy, world, "ddp")  # the policy itself in a single process
    head = head_weight(policy)
    opt = core.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    ckpt = core.TrainableCheckpoints(out / "checkpoints", cfg.keep_checkpoints, world)
    step, _ = ckpt.load(policy, opt)
    log = core.MetricsLog(out, world, tensorboard=cfg.tensorboard, resume_step=step)

    sync_engine(engine, policy)
    before_path = out / "val_before.json"
    before: dict = {"val_reward": float("nan"), "parts": {}, "samples": []}
    if main and before_path.exists():
        before = json.loads(before_path.read_text())
    elif main:
        val, texts, parts = evaluate(engine, reward, test_items, test_prompts, cfg.max_tokens)
        before = {"val_reward": val, "parts": parts, "samples": texts[:cfg.samples]}
        write_json(before_path, before)
        log.log({"step": 0, "val_reward": round(val, 5), **{f"val_reward_{k}": round(v, 5) for k, v in parts.items()}})
    if main:
        console.print(f"  task {task.name}: {len(task.train)} train / {len(test_items)} held-out prompts, reward "
                      f"{task.reward}; G={G} x {P} prompts, loss {cfg.loss_type}; held-out reward before "
                      f"{before['val_reward']:.3f}" + (f"; DDP over {world.world_size} processes, "
                                                       f"{P_mine} prompts each" if world.distributed else ""))

    stop = list(engine.chat_stop_token_ids)
    # rollouts from lower-precision weights than the trained float32 policy: correct with truncated IS
    correct = cfg.rollout_is_cap > 0 and (cfg.rollout_dtype != "float32" or cfg.rollout_quantize != "none")
    skipped_groups = 0
    last: dict = {}
    t_start = time.time()
    with core.bar_for(world) as bar:
        task_bar = bar.add_task("grpo", total=cfg.max_steps, completed=step, rate="")
        while step < cfg.max_steps:
            lr = core.set_lr(opt, core.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            idx = prompt_indices(len(task.train), P, cfg.seed, step)[first:first + P_mine]
            # 1. rollouts: seeds are functions of (seed, step, global row), whichever rank samples the row
            t0 = time.time()
            engine.reset_prefix_cache()
            prompts = [train_prompts[i] for i in idx for _ in range(G)]
            params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                     stop_token_ids=stop, seed=_seed_of(cfg.seed, step, first * G + r),
                                     logprobs=0 if correct else None)
                      for r in range(len(prompts))]
            results = engine.generate_batch(prompts, params)
            rollout_s = time.time() - t0
            completions = [r.token_ids for r in results]
            sampled_lp = torch.tensor([s.logprob for r in results for s in r.logprobs], dtype=torch.float32) \
                if correct else None
            # 2. rewards, and advantages within this rank's groups
            scored = [reward.score(_prompt_text(task.train[idx[r // G]]), res.text, task.train[idx[r // G]].fields)
                      for r, res in enumerate(results)]
            rew = torch.tensor([s.total for s in scored], dtype=torch.float32).view(P_mine, G)
            failed = torch.tensor([s.failed for s in scored]).view(P_mine, G)
            valid = ~failed.all(dim=1)
            adv = group_advantages(rew, valid, cfg.scale_rewards).view(-1)
            batch = build_batch(prompts, completions, pad_id, G)
            row_of = torch.repeat_interleave(torch.arange(len(prompts)), batch.n_tokens)
            adv_tok = adv[row_of]
            # the whole step's figures (every rank's rows, in global row order): loss normaliser and metrics
            ranks = distributed.gather({"total": [s.total for s in scored], "failed": [s.failed for s in scored],
                                        "parts": {n: [s.parts[n] for s in scored] for n in reward.names},
                                        "n_gen": int(batch.n_tokens.sum()), "rollout_s": rollout_s}, world)
            all_rew = torch.tensor([x for r in ranks for x in r["total"]], dtype=torch.float32)
            all_failed = torch.tensor([x for r in ranks for x in r["failed"]]).view(P, G)
            all_parts = {n: [x for r in ranks for x in r["parts"][n]] for n in reward.names}
            n_gen = sum(r["n_gen"] for r in ranks)
            n_skipped = int(all_failed.all(dim=1).sum())
            if n_skipped:
                skipped_groups += n_skipped
                if main:
                    console.print(f"[yellow]  step {step + 1}: {n_skipped} group(s) skipped: every reward of the "
                                  f"group failed[/]")
            # 3. reference (and old-policy) log-probs, once per batch
            t0 = time.time()
            ref_lp = None
            with torch.no_grad():
                if cfg.beta > 0:
                    if ref_model is not None:
                        ref_lp, _ = token_logps(ref_model, batch)
                    else:
                        with policy.disable_adapter():
                            ref_lp, _ = token_logps(policy, batch)
                old_lp = token_logps(policy, batch)[0] if cfg.iterations > 1 else None
            ref_s = time.time() - t0
            # 4. policy update(s)
            t0 = time.time()
            iter_stats = []

            is_w: list[torch.Tensor] = []  # the truncated IS weights, from the first iteration's old log-probs
            is_stats = {"is_sum": 0.0, "is_capped": 0.0}

            def loss_of(it: int) -> tuple[torch.Tensor, dict]:
                logp, ent = token_logps(ddp, batch, with_entropy=it == 0, head=head)
                old = old_lp if old_lp is not None else logp.detach()
                if sampled_lp is not None and not is_w:
                    w, st_is = rollout_is_weight(old, sampled_lp, cfg.rollout_is_cap)
                    is_w.append(w)
                    is_stats.update(st_is)
                loss, st = grpo_loss(logp, old, ref_lp, adv_tok, row_of, len(prompts), batch.n_tokens, cfg,
                                     total_rows=P * G, total_tokens=n_gen, is_weight=is_w[0] if is_w else None)
                if ent is not None:
                    st["entropy_sum"] = float(ent.sum())
                # x world size: DDP averages the ranks' gradients, their sum is the one-process gradient
                return loss * world.world_size, st

            for it in range(cfg.iterations):  # one optimiser step per iteration over the same rollouts
                res = core.step(opt, policy.parameters(), [it], loss_of, grad_clip=cfg.grad_clip, at_step=step + 1,
                                world=world, ddp=ddp)
                iter_stats += res.stats
            loss_value, grad_norm = res.loss, res.grad_norm
            sums = distributed.sum_over_ranks([iter_stats[0]["entropy_sum"], iter_stats[0]["kl_sum"],
                                               is_stats["is_sum"], is_stats["is_capped"]]
                                              + [x["clipped"] for x in iter_stats], world)
            n_tok = max(n_gen, 1)
            train_s = time.time() - t0
            step += 1
            t0 = time.time()
            sync_engine(engine, policy)
            sync_s = time.time() - t0
            rollout_max = max(r["rollout_s"] for r in ranks)  # the step waits for the slowest rank's rollouts
            rec = {"step": step, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
                   "reward": round(float(all_rew.mean()), 5), "reward_std": round(float(all_rew.std()), 5),
                   **{f"reward_{n}": round(float(np.mean(all_parts[n])), 5) for n in reward.names},
                   **{f"reward_{n}_std": round(float(np.std(all_parts[n])), 5) for n in reward.names},
                   "kl": round(sums[1] / n_tok, 6),  # of the policy that sampled the batch
                   "clip_fraction": round(float(np.mean(sums[4:])) / n_tok, 5),
                   **({"rollout_is_mean": round(sums[2] / n_tok, 5), "rollout_is_capped": round(sums[3] / n_tok, 5)}
                      if correct else {}),
                   "completion_len": round(n_gen / (P * G), 2), "entropy": round(sums[0] / n_tok, 4),
                   "skipped_groups": n_skipped, "reward_failures": int(all_failed.sum()),
                   "rollout_s": round(rollout_max, 3), "ref_s": round(ref_s, 3), "train_s": round(train_s, 3),
                   "sync_s": round(sync_s, 3), "rollout_tokens_per_s": round(n_gen / max(rollout_max, 1e-9), 1)}
            if main and test_items and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val, _, parts = evaluate(engine, reward, test_items, test_prompts, cfg.max_tokens)
                rec["val_reward"] = round(val, 5)
                rec.update({f"val_reward_{k}": round(v, 5) for k, v in parts.items()})
            log.log(rec)
            last = rec
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                ckpt.save(step, policy, opt)
            bar.update(task_bar, completed=step, rate=f"reward {rec['reward']:.3f} kl {rec['kl']:.4f}")
    seconds = time.time() - t_start
    log.close()
    failures: dict[str, int] = {}
    for counts in distributed.gather(dict(reward.failures), world):
        for k, v in counts.items():
            failures[k] = failures.get(k, 0) + v
    if not main:  # other ranks only roll out and train
        return {"steps": step, "world_size": world.world_size}

    final_val, texts, final_parts = evaluate(engine, reward, test_items, test_prompts, cfg.max_tokens)
    samples = [{"prompt": _prompt_text(it), "before": b, "after": a}
               for it, b, a in zip(test_items, before["samples"], texts[:cfg.samples])]
    write_json(out / "samples.json", samples)
    policy.eval()
    if cfg.lora_r:
        save_adapter(policy, out, model_dir)
    else:
        save_model(policy, out)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    plot_reward(out / "metrics.jsonl", out / "reward.png", f"GRPO on {task.name} ({cfg.loss_type}, G={G})")
    return {
        "mode": "lora" if cfg.lora_r else "full", **share, "task": task.name, "reward_spec": task.reward,
        "steps": step, "train_prompts": len(task.train), "test_prompts": len(test_items),
        "val_reward_before": round(before["val_reward"], 4), "val_reward_after": round(final_val, 4),
        "val_reward_parts_before": before["parts"], "val_reward_parts_after": final_parts,
        "final": {k: v for k, v in last.items() if k != "step"},
        "skipped_groups": skipped_groups, "reward_failures": failures,
        "train_seconds": round(seconds, 2), "peak_rss_mb": round(core.peak_rss_mb(), 1),
        "world_size": world.world_size,
    }
