"""The DPO stage: align a model folder with preference pairs (chosen vs. rejected answers).

Data: JSONL records ``{"prompt": str | [messages], "chosen": str, "rejected": str}``; a bad line raises
``ChatDataError("file:line: field: why")`` or is a counted skip (``on_error``).  Each answer is rendered after its
prompt with the chat template; only the answer's tokens (and its end-of-turn marker) count in its log-probability.

Losses (``loss``):

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(β [(π_c - ref_c) - (π_r - ref_r)])`` on summed log-probs;
* ``ipo`` (Azar et al. 2023): ``(h - 1/(2β))²`` with ``h`` the same difference on per-token mean log-probs;
* ``simpo`` (Meng et al. 2024): ``-log σ(β (π̄_c - π̄_r) - γ)`` on per-token means, reference-free.

The reference model's log-probs are computed once, before training, under no_grad, by the policy itself before its
first step (it holds the reference's weights), and cached in ``reference_logps.json``: no second model is ever loaded
(a resumed run reuses the cache; only a resume whose cache is gone loads a temporary reference).
Works with LoRA (``lora_r: R``, ``--lora-r R``; ``full: true`` or no rank = full fine-tuning): the adapter folder is
the output, as for SFT.

Metrics (``METRICS``) have one name each, everywhere: ``metrics.jsonl`` (train: ``loss``, ``reward_margin``, ...;
held-out: the same names prefixed ``val_``), the manifest (``final``, ``val_before``, ``val_after``) and the docs.
``reward_*`` are the beta-scaled implicit rewards the loss compares; ``logp_margin`` is the unscaled policy log-prob
difference.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from lmforge.align.chat_data import (IGNORE, SKIP_HINT, ChatDataError, ChatTokenizer, DataStats, Example,
                                     _check_text, _reason, collate, encode_conversation, pad_id_of, read_jsonl,
                                     validate_messages)
from lmforge.align.lora import (DEFAULT_TARGETS, FULL_HELP, LORA_R_HELP, TOKENIZER_FILES, add_lora,
                                check_lora_rank, mode_line, save_adapter, trainable_share)
from lmforge.artifacts import Manifest, write_json
from lmforge.config import StageConfig
from lmforge.model.hf import load_model, save_model
from lmforge.progress import console
from lmforge.train import core
from lmforge.train.core import checkpointing_on, lr_at, peak_rss_mb
from lmforge.train.loss import head_weight, linear_log_probs, logit_softcap
from lmforge.train.plots import plot_loss

STAGE = "dpo"
VERSION = "1"
REF_CACHE = "reference_logps.json"


class Config(StageConfig):
    """Preference alignment (DPO / IPO / SimPO) of a model folder on chosen/rejected JSONL."""

    model: str = Field(description="Model folder to start from; also the frozen reference.")
    data: str = Field(description="Preference JSONL: {prompt, chosen, rejected}.")
    val_data: str | None = Field(None, description="Held-out preference JSONL; default: a val_fraction split.")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="Share of pairs held out when val_data is not given.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad or over-long records: error or counted skip.")
    loss: Literal["sigmoid", "ipo", "simpo"] = Field("sigmoid", description="Preference loss.")
    beta: float = Field(0.1, gt=0, description="Strength of the preference (inverse KL weight for DPO/IPO).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin.")
    seq_len: int = Field(512, ge=8, description="Longest prompt + answer kept.")
    batch_size: int = Field(4, ge=1, description="Pairs per optimizer step.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables).")
    eval_every: int = Field(25, ge=1, description="Steps between held-out margin measurements.")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    full: bool | None = Field(None, description=FULL_HELP)
    lora_r: int | None = Field(None, validate_default=True, description=LORA_R_HELP)
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description="LoRA target layers.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    activation_checkpointing: bool | None = Field(
        None, description="Recompute each decoder layer's activations in the backward pass: much less memory, ~1/3 "
                          "more compute; default on with --lora-r (activations dominate: 7.1 → 3.3 GB for SmolLM2 "
                          "LoRA, docs/benchmarks.md), off with --full (weights and optimizer state dominate).")
    seed: int = Field(1337, description="Seed for the data order.")

    @field_validator("lora_r")
    @classmethod
    def _explicit_mode(cls, v: int | None, info: ValidationInfo) -> int | None:
        return check_lora_rank(v, info.data.get("full"))


# ----------------------------------------------------------------------------------------------------------------------
# data


def pair_to_conversations(record: Any, where: str) -> tuple[list[dict], list[dict]]:
    """``(chosen_messages, rejected_messages)`` of a preference record."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ChatDataError(f"{where}: {key}: missing")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": _check_text(prompt, "prompt", where)}]
    else:
        prompt_msgs = validate_messages(prompt, where, "prompt", require_assistant_last=False)
        if prompt_msgs[-1]["role"] != "user":
            raise ChatDataError(f"{where}: prompt: the prompt must end with a user message")
    chosen = _check_text(record["chosen"], "chosen", where)
    rejected = _check_text(record["rejected"], "rejected", where)
    return (prompt_msgs + [{"role": "assistant", "content": chosen}],
            prompt_msgs + [{"role": "assistant", "content": rejected}])


def encode_pairs(tok: ChatTokenizer, path: str | os.PathLike, max_len: int, on_error: Literal["raise", "skip"] = "raise",
                 stats: DataStats | None = None) -> list[tuple[Example, Example]]:
    stats = stats if stats is not None else DataStats()
    pairs = []
    for where, record, error in read_jsonl(path):
        stats.lines += 1
        try:
            if error is not None:
                raise error
            chosen, rejected = pair_to_conversations(record, where)
            c, r = encode_conversation(tok, chosen, "last", where), encode_conversation(tok, rejected, "last", where)
        except ChatDataError as err:
            if on_error == "raise":
                raise ChatDataError(f"{err}; {SKIP_HINT}") from None
            stats.skip("invalid_json" if error is not None else _reason(str(err)), where)
            continue
        longest = max(len(c.input_ids), len(r.input_ids))
        if longest > max_len:
            if on_error == "raise":
                raise ChatDataError(f"{where}: pair is {longest} tokens, over seq_len {max_len}; a larger --seq-len "
                                    f"(seq_len) keeps it, {SKIP_HINT}")
            stats.skip("too_long", where)
            continue
        stats.kept += 1
        pairs.append((c, r))
    return pairs


# ----------------------------------------------------------------------------------------------------------------------
# log-probs and losses


def sequence_logps(model: nn.Module, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each example's target tokens [N] and the number of those tokens [N].

    Only the target tokens go through the output head, in chunks (``linear_log_probs``): no [N, T, vocab] logits."""
    batch = collate(examples, [[i] for i in range(len(examples))], pad_id, packed=False)
    mask = batch.labels != IGNORE
    if logit_softcap(model):  # soft-capped logits (Gemma): the full-logits path
        logits = model(batch.input_ids)[mask].float()
        token_lp = logits.log_softmax(-1).gather(1, batch.labels[mask][:, None]).squeeze(1)
    else:
        hidden = model(batch.input_ids, return_hidden=True)
        token_lp = linear_log_probs(hidden[mask], head_weight(model), batch.labels[mask])
    sums = torch.zeros(len(examples), dtype=token_lp.dtype).index_add(0, mask.nonzero()[:, 0], token_lp)
    return sums, mask.sum(-1)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[tuple[Example, Example]], pad_id: int,
                    batch_size: int = 8) -> list[tuple[float, float]]:
    model.eval()
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        lp, _ = sequence_logps(model, [c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        out.extend(zip(lp[:len(chunk)].tolist(), lp[len(chunk):].tolist()))
    return out


def preference_loss(kind: str, beta: float, pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
                    rc: torch.Tensor, rr: torch.Tensor, gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over pairs and the statistics logged for it (``METRICS``: the same names in the train log, the
    held-out metrics and the manifest).

    ``pc/pr``: policy summed log-probs of chosen/rejected; ``nc/nr`` their token counts; ``rc/rr`` the reference's."""
    if kind == "sigmoid":
        rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
        loss = -F.logsigmoid(rew_c - rew_r)
    elif kind == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        rew_c, rew_r = beta * (pc - rc) / nc, beta * (pr - rr) / nr
        loss = (h - 1 / (2 * beta)) ** 2
    elif kind == "simpo":
        rew_c, rew_r = beta * pc / nc, beta * pr / nr
        loss = -F.logsigmoid(rew_c - rew_r - gamma)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    rew_c, rew_r = rew_c.detach(), rew_r.detach()
    stats = {"reward_chosen": float(rew_c.mean()), "reward_rejected": float(rew_r.mean()),
             "reward_margin": float((rew_c - rew_r).mean()), "reward_accuracy": float((rew_c > rew_r).float().mean()),
             "logp_margin": float((pc.detach() - pr.detach()).mean())}
    return loss.mean(), stats


METRICS = {
    "loss": "the preference loss (``loss``: sigmoid, ipo or simpo), mean over pairs",
    "reward_chosen": "implicit reward of the chosen answers, scaled by beta as the loss sees it: β(π_c - ref_c) for "
                     "sigmoid, β(π_c - ref_c)/n_c for ipo, β π_c/n_c for simpo (π = summed log-prob, n = tokens)",
    "reward_rejected": "the same for the rejected answers",
    "reward_margin": "reward_chosen - reward_rejected (beta-scaled), mean over pairs",
    "reward_accuracy": "share of pairs whose chosen answer has the larger implicit reward",
    "logp_margin": "policy log p(chosen) - log p(rejected), summed log-probs, not scaled by beta",
}


@torch.no_grad()
def preference_metrics(model: nn.Module, pairs: list[tuple[Example, Example]], pad_id: int,
                       ref: list[tuple[float, float]], kind: str, beta: float, gamma: float = 0.5) -> dict[str, float]:
    """Held-out ``METRICS`` (``loss`` included) over all ``pairs``, computed by ``preference_loss`` like in training;
    ``ref`` holds the reference's summed log-probs of each pair."""
    if not pairs:
        return {}
    was = model.training
    model.eval()
    policy = reference_logps(model, pairs, pad_id)
    model.train(was)
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731 (exact means over the whole held-out set)
    loss, stats = preference_loss(kind, beta, t([c for c, _ in policy]), t([r for _, r in policy]),
                                  t([c.n_target_tokens for c, _ in pairs]), t([r.n_target_tokens for _, r in pairs]),
                                  t([c for c, _ in ref]), t([r for _, r in ref]), gamma)
    return {"loss": float(loss), **stats}


# ----------------------------------------------------------------------------------------------------------------------
# the stage


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    return core.run_local(STAGE, VERSION, out, config, force, ("checkpoints", "metrics.jsonl", REF_CACHE),
                          lambda: train(config, out))


def _cached_reference(path: Path, model_dir: Path, pairs, pad_id: int,
                      initial: nn.Module | None = None) -> list[tuple[float, float]]:
    """Reference log-probs of the pairs: read from ``path``, else computed (under no_grad) with ``initial`` -- the
    policy before its first step, which holds the reference's weights (LoRA adapters start at zero), so no second model
    is loaded -- or, when the policy has trained already (a resume without the cache), with a temporary copy of the
    reference."""
    if path.exists():
        cached = json.loads(path.read_text())
        if len(cached["logps"]) == len(pairs):
            return [tuple(x) for x in cached["logps"]]
    if initial is not None:
        was = initial.training
        logps = reference_logps(initial, pairs, pad_id)
        initial.train(was)
    else:
        ref_model = load_model(model_dir)
        logps = reference_logps(ref_model, pairs, pad_id)
        del ref_model  # the reference is not held during training
    write_json(path, {"model": str(model_dir.resolve()), "logps": logps})
    return logps


def train(cfg: Config, out: Path) -> dict:
    console.print(f"  {mode_line(cfg.full, cfg.lora_r)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = Path(cfg.model)
    tok = ChatTokenizer.from_folder(model_dir)
    pad_id = pad_id_of(model_dir, tok)
    stats = {"data": DataStats()}
    pairs = encode_pairs(tok, cfg.data, cfg.seq_len, cfg.on_error, stats["data"])
    if cfg.val_data:
        stats["val_data"] = DataStats()
        train_pairs, val_pairs = pairs, encode_pairs(tok, cfg.val_data, cfg.seq_len, cfg.on_error, stats["val_data"])
    else:
        order = np.random.default_rng([cfg.seed, 999]).permutation(len(pairs)).tolist()
        n_val = int(round(len(pairs) * cfg.val_fraction))
        val_idx = set(order[:n_val])
        train_pairs = [p for i, p in enumerate(pairs) if i not in val_idx]
        val_pairs = [p for i, p in enumerate(pairs) if i in val_idx]
    for key, st in stats.items():
        st.report("preference pairs", getattr(cfg, key))
    if not train_pairs:
        why = stats["data"].summary("preference pairs", cfg.data) or f"{stats['data'].lines} records"
        raise ValueError(f"{cfg.data}: no usable preference pair ({why})")

    torch.manual_seed(cfg.seed)
    base = load_model(model_dir)
    model: nn.Module = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) \
        if cfg.lora_r else base
    if checkpointing_on(cfg):
        from lmforge.train.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(base)
    ckpts = core.TrainableCheckpoints(out / "checkpoints", cfg.keep_checkpoints)
    # reference log-probs of train + held-out pairs, computed once (SimPO is reference-free: held-out only)
    ref_all = _cached_reference(out / REF_CACHE, model_dir, train_pairs + val_pairs, pad_id,
                                initial=None if ckpts.exists() else model)
    ref, val_ref = ref_all[:len(train_pairs)], ref_all[len(train_pairs):]
    model.train()
    share = trainable_share(model)
    opt = core.make_optimizer(model, cfg.lr, 0.0)
    step, _ = ckpts.load(model, opt)
    before = preference_metrics(model, val_pairs, pad_id, val_ref, cfg.loss, cfg.beta, cfg.simpo_gamma)
    console.print(f"  {len(train_pairs)} train / {len(val_pairs)} held-out pairs, loss {cfg.loss}, beta {cfg.beta}; "
                  f"held-out reward_margin before {before.get('reward_margin', float('nan')):.3f}")

    def pair_indices(b: int) -> list[int]:
        n = len(train_pairs)
        flat = [b * cfg.batch_size + k for k in range(cfg.batch_size)]
        return [int(np.random.default_rng([cfg.seed, i // n]).permutation(n)[i % n]) for i in flat]

    t0 = time.time()
    last: dict[str, float] = {}
    after = before
    with core.MetricsLog(out, resume_step=step) as log, core.bar_for(core.World()) as bar:
        task = bar.add_task(f"dpo ({cfg.loss})", total=cfg.max_steps, completed=step, rate="")
        while step < cfg.max_steps:
            lr = core.set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            idx = pair_indices(step)

            def pair_loss(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
                lp, n = sequence_logps(model, [train_pairs[i][0] for i in idx] + [train_pairs[i][1] for i in idx],
                                       pad_id)
                B = len(idx)
                rc = torch.tensor([ref[i][0] for i in idx])
                rr = torch.tensor([ref[i][1] for i in idx])
                return preference_loss(cfg.loss, cfg.beta, lp[:B], lp[B:], n[:B], n[B:], rc, rr, cfg.simpo_gamma)

            result = core.step(opt, model.parameters(), [idx], pair_loss, grad_clip=cfg.grad_clip, at_step=step)
            loss_value, st = result.loss, result.stats[0]
            step += 1
            last = {"loss": loss_value, **st}
            rec = {"step": step, "loss": round(loss_value, 5), "lr": lr, "grad_norm": round(result.grad_norm, 4),
                   **{k: round(v, 5) for k, v in st.items()}}
            if val_pairs and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                after = preference_metrics(model, val_pairs, pad_id, val_ref, cfg.loss, cfg.beta, cfg.simpo_gamma)
                rec.update({f"val_{k}": round(v, 5) for k, v in after.items()})
            log.log(rec)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                ckpts.save(step, model, opt)
            bar.update(task, completed=step, rate=f"loss {loss_value:.3f} reward_margin {st['reward_margin']:.3f}")
    seconds = time.time() - t0
    opt.state.clear()  # AdamW state (2 x the trainable weights) is not needed to save the model: free it first

    model.eval()
    if cfg.lora_r:
        save_adapter(model, out, model_dir)
    else:
        save_model(model, out)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"preference loss ({cfg.loss})")
    return {
        "mode": "lora" if cfg.lora_r else "full", **share, "preference_loss": cfg.loss, "steps": step,
        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
        **{key: st.as_dict() for key, st in stats.items()},  # "data" (and "val_data"): kept, skipped per reason
        "final": {k: round(v, 4) for k, v in last.items()},
        "val_before": {k: round(v, 4) for k, v in before.items()},
        "val_after": {k: round(v, 4) for k, v in after.items()},
        "train_seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
    }
