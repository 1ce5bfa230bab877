"""The eval stage: validation loss, perplexity and bits-per-byte on held-out text, benchmark tasks, greedy samples.

With ``tasks`` (task YAML files or suite folders such as ``tasks/core``, see ``lmforge.eval.tasks``) every task is
scored; ``results.json`` holds each task's metrics with bootstrap confidence intervals and the aggregate centred score,
``items/<task>.jsonl`` the per-item records, and the registry gets ``<task>.<metric>`` metrics (``lmforge
leaderboard`` reads them).  ``data`` (the held-out token split of a tokenizer artifact) is optional when tasks are given.

Bits-per-byte divides the summed negative log-likelihood (in bits) by the UTF-8 bytes of the predicted tokens, so it
compares models whose tokenizers differ.  With a byte-level BPE every character of a token's string stands for one
byte, which gives each token's byte length exactly; special tokens count zero bytes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from lmforge.artifacts import Manifest, write_json, write_text
from lmforge.config import ConfigError, StageConfig
from lmforge.eval.harness import LM, aggregate, run_task
from lmforge.eval.tasks import find_tasks, load_task
from lmforge.model.generate import generate
from lmforge.model.hf import load_model
from lmforge.progress import console, progress, rate_text
from lmforge.stages import begin, finished
from lmforge.tokenizer.bpe import load_tokenizer
from lmforge.tokenizer.shards import eval_windows, load_split

STAGE = "eval"
VERSION = "2"

DEFAULT_PROMPTS = ["To be, or not to be", "In the beginning God created", "The Python interpreter"]


class Config(StageConfig):
    """Evaluate a model folder on the held-out split of a tokenizer artifact."""

    model: str = Field(description="Model folder (HF layout with tokenizer files), e.g. a pretrain artifact.")
    data: str | None = Field(None, description="Tokenizer artifact whose `val` split is the held-out text "
                                               "(optional when tasks are given).")
    tasks: list[str] = Field(default_factory=list, description="Task YAML files or suite folders (e.g. tasks/core).")
    task_limit: int | None = Field(None, ge=1, description="Score at most this many items per task.")
    task_max_len: int = Field(1024, ge=16, description="Longest context (tokens) fed to the model for tasks.")
    batch_tokens: int = Field(4096, ge=64, description="Tokens per forward pass when scoring tasks.")
    split: str = Field("val", description="Split of the token shards to evaluate on.")
    seq_len: int = Field(0, ge=0, description="Window length; 0 uses the model's context length.")
    max_windows: int = Field(64, ge=1, description="At most this many windows are scored.")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="Prompts for greedy samples.")
    max_new_tokens: int = Field(40, ge=1, description="Tokens generated per sample.")
    bpb_by: str | None = Field(None, description="A document meta field (e.g. lang): loss and bits-per-byte per "
                               "value, on the documents the `data` tokenizer artifact held out (read from the data "
                               "it was packed from); metrics val_bpb.<field>.<value>.")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for special tokens)."""
    byte_chars = set(_bytes_to_unicode().values())
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        if token in specials:
            continue
        if all(c in byte_chars for c in token):
            lengths[idx] = len(token)
        else:  # not byte-level: fall back to decoding the token
            lengths[idx] = len(tokenizer.decode([idx], skip_special_tokens=True).encode("utf-8"))
    return lengths


@torch.no_grad()
def score(model, tokens: np.ndarray, seq_len: int, max_windows: int, byte_lengths: np.ndarray) -> dict:
    """Summed NLL over consecutive windows → loss (nats/token), perplexity and bits per byte."""
    nll, n_tokens, n_bytes = 0.0, 0, 0
    windows = min(max_windows, max(1, math.ceil((len(tokens) - 1) / seq_len)))
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("scoring held-out text", total=windows, rate="")
        for i, (x, y) in enumerate(eval_windows(tokens, seq_len, max_windows)):
            logits = model(x)
            nll += float(torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1),
                                                           reduction="sum"))
            n_tokens += y.numel()
            n_bytes += int(byte_lengths[y.numpy()].sum())
            bar.update(task, completed=i + 1, rate=rate_text(n_tokens, time.time() - t0, "tok"))
    loss = nll / max(1, n_tokens)
    return {"val_loss": round(loss, 4), "val_ppl": round(math.exp(min(loss, 50)), 3),
            "val_bpb": round(nll / math.log(2) / max(1, n_bytes), 4), "val_tokens_scored": n_tokens,
            "val_bytes_scored": n_bytes}


def score_groups(model, tokenizer, tok_cfg: dict, tokenizer_dir: Path, field: str, seq_len: int, max_windows: int,
                 byte_lengths: np.ndarray) -> dict[str, dict]:
    """``score`` per value of ``meta[field]`` over the tokenizer artifact's held-out documents, each group's documents
    packed as the tokenizer stage packs them (ids + end-of-text).  A document without the field counts as ``(none)``."""
    from lmforge.tokenizer.evaluate import held_out_documents

    eos = tokenizer.token_to_id(tok_cfg.get("eos_token") or "<|endoftext|>")
    groups: dict[str, list[str]] = {}
    for doc in held_out_documents(tokenizer_dir):
        groups.setdefault(str((doc.get("meta") or {}).get(field) or "(none)"), []).append(doc["text"])
    out = {}
    for value, texts in sorted(groups.items()):
        ids: list[int] = []
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids + ([eos] if eos is not None else []))
        if len(ids) < 2:
            continue
        res = score(model, np.array(ids, dtype=np.int64), seq_len, max_windows, byte_lengths)
        out[value] = {**res, "docs": len(texts)}
    return out


def _task_inputs(config: Config) -> dict[str, str]:
    """Each task's YAML and JSONL as fingerprinted inputs (a changed item re-runs the eval)."""
    inputs = {}
    for i, path in enumerate(find_tasks(config.tasks)):
        task = load_task(path)
        inputs[f"task{i}"] = str(path)
        inputs[f"task{i}_data"] = str((path.parent / task.spec.data).resolve())
    return inputs


def run_tasks(config: Config, model, tokenizer, tok_cfg: dict, out: Path) -> tuple[dict, dict]:
    """Score every task; writes ``items/<task>.jsonl``; returns ``(per-task results, registry metrics)``."""
    lm = LM(model, tokenizer, tok_cfg, batch_tokens=config.batch_tokens, max_len=config.task_max_len)
    results, metrics = {}, {}
    for path in find_tasks(config.tasks):
        task = load_task(path)
        if config.task_limit:
            task.items = task.items[:config.task_limit]
        res = run_task(lm, task)
        items = res.pop("items")
        write_text(out / "items" / f"{task.name}.jsonl", "".join(json.dumps(r) + "\n" for r in items))
        results[task.name] = res
        metrics[f"{task.name}.{res['metric']}"] = round(res["score"], 5)
        metrics[f"{task.name}.ci_low"], metrics[f"{task.name}.ci_high"] = (round(v, 5) for v in res["ci"])
        if res.get("truncated_requests"):
            metrics[f"{task.name}.truncated_requests"] = res["truncated_requests"]
    agg = aggregate(list(results.values()))
    if agg is not None:
        metrics["aggregate_centered"] = round(agg, 5)
    return results, metrics


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    if config.data is None and not config.tasks:
        raise ConfigError("eval: give `data` (a tokenizer artifact), `tasks`, or both")
    if config.bpb_by and not config.data:
        raise ConfigError("eval: bpb_by needs `data` (the tokenizer artifact whose held-out documents are scored)")
    inputs = {"model": config.model, **({"data": config.data} if config.data else {}), **_task_inputs(config)}
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        model = load_model(config.model)
        tokenizer, tok_cfg = load_tokenizer(config.model)
        metrics: dict = {}
        if config.data:
            tokens = load_split(Path(config.data) / "tokens", config.split)
            seq_len = config.seq_len or model.config.max_position_embeddings
            byte_lengths = token_byte_lengths(tokenizer)
            metrics = score(model, tokens, seq_len, config.max_windows, byte_lengths)
        by_group = {}
        if config.bpb_by:
            by_group = score_groups(model, tokenizer, tok_cfg, Path(config.data), config.bpb_by, seq_len,
                                    config.max_windows, byte_lengths)
            for value, res in by_group.items():
                metrics[f"val_bpb.{config.bpb_by}.{value}"] = res["val_bpb"]
                metrics[f"val_loss.{config.bpb_by}.{value}"] = res["val_loss"]
        task_results, task_metrics = run_tasks(config, model, tokenizer, tok_cfg, out) if config.tasks else ({}, {})
        eos = tokenizer.token_to_id(tok_cfg.get("eos_token") or "<|endoftext|>")
        samples = []
        for prompt in config.prompts:
            ids = tokenizer.encode(prompt).ids
            new = generate(model, ids, config.max_new_tokens, temperature=0.0, eos_token_id=eos)
            samples.append({"prompt": prompt, "completion": tokenizer.decode(new)})
        run_.metrics.update(metrics)
        run_.metrics.update(task_metrics)
        write_json(out / "results.json", {"model": str(Path(config.model).resolve()), "metrics": metrics,
                                          "tasks": task_results,
                                          **({"bpb_by": {"field": config.bpb_by, "groups": by_group}}
                                             if config.bpb_by else {}),
                                          "aggregate_centered": task_metrics.get("aggregate_centered"),
                                          "samples": samples})
        lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
        if task_results:
            lines += ["", "| task | metric | score | 95% CI | n |", "|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {r['metric']} | {r['score']:.4f} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] "
                      f"| {r['n']} |" for r in task_results.values()]
        lines += ["", "## Greedy samples", ""] + [f"- **{s['prompt']}** → {s['completion']!r}" for s in samples]
        write_text(out / "results.md", "\n".join(lines) + "\n")
        if metrics:
            console.print(f"  val loss {metrics['val_loss']}, ppl {metrics['val_ppl']}, bits/byte {metrics['val_bpb']}")
        for value, res in by_group.items():
            console.print(f"  {config.bpb_by}={value}: bits/byte {res['val_bpb']} ({res['docs']} held-out docs, "
                          f"{res['val_bytes_scored']:,} bytes scored)")
        for s in samples:
            console.print(f"  [dim]{s['prompt']}[/] → {s['completion']!r}")
    return finished(out)
