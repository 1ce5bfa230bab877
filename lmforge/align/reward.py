"""Reward models: a Bradley–Terry scalar head on our Llama, trained on chosen/rejected pairs; scoring.

``lmforge reward train --model DIR --data prefs.jsonl`` reads the same preference JSONL as ``lmforge dpo`` (its reader,
``dpo.encode_pairs``, with its ``file:line: field`` errors and ``--on-error skip``) and trains
``r(conversation) = w · h_last`` where ``h_last`` is the final hidden state of the conversation's last token that is
not padding, with the Bradley–Terry loss ``-log σ(r(chosen) - r(rejected))`` (Ouyang et al. 2022).  The whole model
trains (``--full``, the default) or LoRA adapters plus the head (``--lora-r R``).  The held-out pairwise accuracy
(share of held-out pairs whose chosen answer scores higher) is measured before and after training.

The artifact folder is a Hugging Face ``LlamaForSequenceClassification`` folder: ``config.json`` (``num_labels: 1``,
``pad_token_id``), ``model.safetensors`` (``model.*`` + ``score.weight``; LoRA adapters merged in) and the tokenizer
files, so ``transformers.AutoModelForSequenceClassification`` loads it and gives the same scores (tested): HF pools at
the rightmost token that is not ``pad_token_id``, and so do we.

Python API (for best-of-n sampling and GRPO reward functions)::

    rm = load_reward_model("runs/reward")
    rm.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])  # chat, rendered
    rm.score_completions(["2+2?"], ["4"])  # the same, from prompt/completion strings
    rm.score(["raw text scored as it is"])  # plain strings are tokenized as given

``lmforge reward score --model RM_DIR --data FILE`` scores JSONL records ``{"prompt", "completion"}`` or
``{"messages": [...]}`` and writes each record with its ``score`` (to ``--output`` or standard output).

The loop is ``train/core.py``'s: AdamW, warmup + cosine, clipping, finite-loss check, checkpoints of the trainable
tensors (exact resume after a crash), ``metrics.jsonl`` + ``loss.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from safetensors.torch import save_file
from torch import nn

from lmforge.align.chat_data import (ChatDataError, ChatTokenizer, DataStats, Example, pad_id_of, read_jsonl,
                                     validate_messages, _check_text)
from lmforge.align.dpo import encode_pairs
from lmforge.align.lora import (DEFAULT_TARGETS, FULL_HELP, LORA_R_HELP, TOKENIZER_FILES, add_lora,
                                check_lora_rank, mode_line, trainable_share)
from lmforge.artifacts import Manifest, atomic_path, write_json
from lmforge.config import ConfigError, StageConfig
from lmforge.model.families import weights_from_hf
from lmforge.model.hf import load_config, load_model, load_state_dict, state_dict_for_save
from lmforge.model.llama import Llama
from lmforge.progress import console
from lmforge.train import core
from lmforge.train.core import checkpointing_on, lr_at, peak_rss_mb
from lmforge.train.plots import plot_loss

STAGE = "reward"
VERSION = "1"


class Config(StageConfig):
    """Train a Bradley–Terry reward model (a scalar head on the model) on chosen/rejected preference JSONL."""

    model: str = Field(description="Model folder to start from (HF layout with tokenizer files).")
    data: str = Field(description="Preference JSONL: {prompt, chosen, rejected} (the format `lmforge dpo` reads).")
    val_data: str | None = Field(None, description="Held-out preference JSONL; default: a val_fraction split.")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="Share of pairs held out when val_data is not given.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad or over-long records: error or counted skip.")
    seq_len: int = Field(512, ge=8, description="Longest prompt + answer kept.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 disables).")
    eval_every: int = Field(25, ge=1, description="Steps between held-out accuracy measurements.")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    full: bool | None = Field(None, description=FULL_HELP)
    lora_r: int | None = Field(None, validate_default=True, description=LORA_R_HELP + " The head always trains; "
                                                                                      "the adapters are merged into "
                                                                                      "the saved model.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description="LoRA target layers.")
    activation_checkpointing: bool | None = Field(
        None, description="Recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more "
                          "compute); default on with --lora-r, off with --full.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    seed: int = Field(1337, description="Seed for the head's initialisation and the data order.")

    @field_validator("lora_r")
    @classmethod
    def _explicit_mode(cls, v: int | None, info: ValidationInfo) -> int | None:
        return check_lora_rank(v, info.data.get("full"))


# ----------------------------------------------------------------------------------------------------------------------
# the model


def last_token_index(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Per row, the rightmost position whose token is not ``pad_id`` (``transformers``' rule; 0 for an all-pad row)."""
    if pad_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


class RewardModel(nn.Module):
    """A decoder (``Llama``, or a peft model around one) and a scalar ``score`` head on its last non-pad token."""

    def __init__(self, body: nn.Module, hidden_size: int, pad_id: int | None) -> None:
        super().__init__()
        self.body = body
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B] of right-padded rows [B, T]."""
        hidden = self.body(input_ids, return_hidden=True)
        last = last_token_index(input_ids, self.pad_id)
        return self.score(hidden[torch.arange(input_ids.shape[0]), last]).squeeze(-1)

    def llama(self) -> Llama:
        """The plain decoder (LoRA adapters merged in, when there are any)."""
        return self.body.merge_and_unload() if hasattr(self.body, "merge_and_unload") else self.body


def pad_rows(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids


def full_ids(ex: Example) -> list[int]:
    """The whole rendered conversation of an example (its inputs plus the last target token)."""
    return list(ex.input_ids) + [ex.labels[-1]] if ex.labels else list(ex.input_ids)


def save_reward_model(model: RewardModel, folder: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
    """Write a ``LlamaForSequenceClassification`` folder (num_labels 1) with the tokenizer files of ``tokenizer_dir``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llama = model.llama()
    cfg = llama.config.to_hf_dict()
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, pad_token_id=model.pad_id, torch_dtype="float32")
    write_json(folder / "config.json", cfg)
    tensors = {k: v for k, v in state_dict_for_save(llama).items() if not k.startswith("lm_head.")}
    tensors["score.weight"] = model.score.weight.detach().float().contiguous()
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, folder / name)


class RewardScorer:
    """A loaded reward model and its tokenizer: ``score`` texts or conversations, ``score_completions``."""

    def __init__(self, model: RewardModel, tok: ChatTokenizer, max_len: int) -> None:
        self.model, self.tok, self.max_len = model.eval(), tok, max_len

    def encode(self, item: str | list[dict[str, Any]]) -> list[int]:
        """Token ids of a plain string (as given) or a message list (rendered with the chat template)."""
        ids = self.tok.encode(item if isinstance(item, str) else self.tok.render(item))
        if len(ids) > self.max_len:
            raise ValueError(f"{len(ids)} tokens, over the reward model's context {self.max_len}")
        return ids

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        out: list[float] = []
        pad = self.model.pad_id if self.model.pad_id is not None else 0
        for s in range(0, len(seqs), batch_size):
            out.extend(self.model(pad_rows(seqs[s:s + batch_size], pad)).tolist())
        return out

    def score(self, items: Sequence[str | list[dict[str, Any]]], batch_size: int = 8) -> list[float]:
        return self.score_ids([self.encode(x) for x in items], batch_size)

    def score_completions(self, prompts: Sequence[str], completions: Sequence[str],
                          batch_size: int = 8) -> list[float]:
        return self.score([[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                           for p, c in zip(prompts, completions)], batch_size)


def load_reward_model(folder: str | os.PathLike) -> RewardScorer:
    """A reward-model folder written by ``lmforge reward train`` (or any single-label ``LlamaForSequenceClassification``
    folder of a family lmforge loads)."""
    folder = Path(folder)
    cfg = load_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    sd = load_state_dict(folder)
    if "score.weight" not in sd or sd["score.weight"].shape[0] != 1:
        raise ValueError(f"{folder} is not a reward model (needs score.weight of one label; "
                         f"found {sorted(k for k in sd if not k.startswith('model.'))[:5]})")
    score = sd.pop("score.weight")
    llama = Llama(cfg)
    missing, unexpected = llama.load_state_dict(weights_from_hf(cfg, sd), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # the head of the language model is not used
    if missing or [k for k in unexpected if "rotary_emb" not in k]:
        raise ValueError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    model = RewardModel(llama, cfg.hidden_size, raw.get("pad_token_id"))
    with torch.no_grad():
        model.score.weight.copy_(score.float())
    return RewardScorer(model.eval(), ChatTokenizer.from_folder(folder), cfg.max_position_embeddings)


# ----------------------------------------------------------------------------------------------------------------------
# training


def pair_scores(model: RewardModel, pairs: Sequence[tuple[Example, Example]],
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen [N] and the rejected [N] answers, in one forward."""
    ids = pad_rows([full_ids(c) for c, _ in pairs] + [full_ids(r) for _, r in pairs], pad_id)
    s = model(ids)
    return s[:len(pairs)], s[len(pairs):]


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley–Terry loss (mean over pairs) and its statistics."""
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    m = margin.detach()
    return loss, {"accuracy": float((m > 0).float().mean()), "margin": float(m.mean()),
                  "score_chosen": float(chosen.detach().mean()), "score_rejected": float(rejected.detach().mean())}


@torch.no_grad()
def pair_metrics(model: RewardModel, pairs: Sequence[tuple[Example, Example]], pad_id: int,
                 batch_size: int = 8) -> dict[str, float]:
    """Held-out loss, pairwise accuracy, mean margin over all ``pairs`` ({} when there are none)."""
    if not pairs:
        return {}
    was = model.training
    model.eval()
    cs, rs = [], []
    for s in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, pairs[s:s + batch_size], pad_id)
        cs.append(c.double())
        rs.append(r.double())
    model.train(was)
    loss, stats = bt_loss(torch.cat(cs), torch.cat(rs))
    return {"loss": float(loss), **stats}


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    return core.run_local(STAGE, VERSION, out, config, force, ("checkpoints", "metrics.jsonl"),
                          lambda: train(config, out))


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng([seed, 999]).permutation(len(pairs)).tolist()
    val_idx = set(order[:int(round(len(pairs) * fraction))])
    return [p for i, p in enumerate(pairs) if i not in val_idx], [p for i, p in enumerate(pairs) if i in val_idx]


def train(cfg: Config, out: Path) -> dict[str, Any]:
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
        train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    for key, st in stats.items():
        st.report("preference pairs", getattr(cfg, key))
    if not train_pairs:
        why = stats["data"].summary("preference pairs", cfg.data) or f"{stats['data'].lines} records"
        raise ValueError(f"{cfg.data}: no usable preference pair ({why})")

    torch.manual_seed(cfg.seed)
    base = load_model(model_dir)
    if cfg.seq_len > base.config.max_position_embeddings:
        raise ConfigError(f"seq_len: {cfg.seq_len} exceeds the model's context {base.config.max_position_embeddings}")
    if not base.config.tie_word_embeddings:
        base.lm_head.weight.requires_grad_(False)  # the language-model head is not used by a reward model
    body: nn.Module = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) \
        if cfg.lora_r else base
    model = RewardModel(body, base.config.hidden_size, pad_id)
    nn.init.normal_(model.score.weight, std=base.config.hidden_size ** -0.5)
    if checkpointing_on(cfg):
        from lmforge.train.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(base)
    model.train()
    share = trainable_share(model)
    opt = core.make_optimizer(model, cfg.lr, cfg.weight_decay)
    ckpts = core.TrainableCheckpoints(out / "checkpoints", cfg.keep_checkpoints)
    step, _ = ckpts.load(model, opt)
    before = pair_metrics(model, val_pairs, pad_id)
    console.print(f"  {len(train_pairs)} train / {len(val_pairs)} held-out pairs; {share['trainable_params'] / 1e6:.3f}M "
                  f"of {share['total_params'] / 1e6:.2f}M parameters trained; held-out accuracy before "
                  f"{before.get('accuracy', float('nan')):.3f}")

    def pair_indices(b: int) -> list[int]:  # epochs of seeded permutations: a pure function of (seed, step)
        n = len(train_pairs)
        flat = [b * cfg.batch_size + k for k in range(cfg.batch_size)]
        return [int(np.random.default_rng([cfg.seed, i // n]).permutation(n)[i % n]) for i in flat]

    def loss_of(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        return bt_loss(*pair_scores(model, [train_pairs[i] for i in idx], pad_id))

    t0 = time.time()
    last: dict[str, float] = {}
    after = before
    with core.MetricsLog(out, resume_step=step) as log, core.bar_for(core.World()) as bar:
        task = bar.add_task("reward", total=cfg.max_steps, completed=step, rate="")
        while step < cfg.max_steps:
            lr = core.set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            result = core.step(opt, model.parameters(), [pair_indices(step)], loss_of, grad_clip=cfg.grad_clip,
                               at_step=step, hint=f"lower the learning rate (lr={cfg.lr})")
            step += 1
            last = {"loss": result.loss, **result.stats[0]}
            rec = {"step": step, "lr": lr, "grad_norm": round(result.grad_norm, 4),
                   **{k: round(v, 5) for k, v in last.items()}}
            if val_pairs and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                after = pair_metrics(model, val_pairs, pad_id)
                rec.update({f"val_{k}": round(v, 5) for k, v in after.items()})
            log.log(rec)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                ckpts.save(step, model, opt)
            bar.update(task, completed=step, rate=f"loss {result.loss:.3f} accuracy {last['accuracy']:.2f}")
    seconds = time.time() - t0
    opt.state.clear()  # AdamW state (2 x the trainable weights) is not needed to save the model: free it first

    model.eval()
    save_reward_model(model, out, model_dir)
    plot_loss(out / "metrics.jsonl", out / "loss.png", title="reward model (Bradley–Terry loss)")
    if after:
        console.print(f"  held-out pairwise accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f} "
                      f"({len(val_pairs)} pairs)")
    return {
        "mode": "lora" if cfg.lora_r else "full", **share, "steps": step,
        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
        **{key: st.as_dict() for key, st in stats.items()},
        "val_accuracy_before": round(before["accuracy"], 4) if before else None,
        "val_accuracy": round(after["accuracy"], 4) if after else None,
        "final": {k: round(v, 4) for k, v in last.items()},
        "val_before": {k: round(v, 4) for k, v in before.items()},
        "val_after": {k: round(v, 4) for k, v in after.items()},
        "train_seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# ----------------------------------------------------------------------------------------------------------------------
# scoring files


class ScoreConfig(StageConfig):
    """Score JSONL records ({prompt, completion} or {messages}) with a reward model; each record is written back with
    its "score"."""

    model: str = Field(description="Reward-model folder (written by `lmforge reward train`).")
    data: str = Field(description="JSONL: {\"prompt\": str, \"completion\": str} or {\"messages\": [...]}.")
    output: str | None = Field(None, description="Output JSONL (default: standard output).")
    batch_size: int = Field(8, ge=1, description="Records per forward pass.")


def record_conversation(record: Any, where: str) -> list[dict[str, Any]]:
    """The messages a record of ``reward score`` stands for (``ChatDataError`` naming file:line: field)."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return validate_messages(record["messages"], where, require_assistant_last=False)
    for key in ("prompt", "completion"):
        if key not in record:
            raise ChatDataError(f"{where}: {key}: missing (give prompt + completion, or messages)")
    return [{"role": "user", "content": _check_text(record["prompt"], "prompt", where)},
            {"role": "assistant", "content": _check_text(record["completion"], "completion", where, allow_empty=True)}]


def score_file(config: ScoreConfig) -> dict[str, Any]:
    """Score every record of ``config.data``; a bad record raises ``ChatDataError("file:line: field: why")``."""
    rm = load_reward_model(config.model)
    records, seqs = [], []
    for where, record, error in read_jsonl(config.data):
        if error is not None:
            raise error
        try:
            seqs.append(rm.encode(record_conversation(record, where)))
        except ValueError as err:
            raise ChatDataError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
        records.append(record)
    scores = rm.score_ids(seqs, config.batch_size)
    lines = "".join(json.dumps({**r, "score": round(s, 6)}, ensure_ascii=False) + "\n" for r, s in zip(records, scores))
    if config.output:
        with atomic_path(config.output) as tmp:
            Path(tmp).write_text(lines, encoding="utf-8")
        console.print(f"  {len(records)} records scored → {config.output}")
    else:
        sys.stdout.write(lines)
    return {"records": len(records), "mean_score": float(np.mean(scores)) if scores else None}
