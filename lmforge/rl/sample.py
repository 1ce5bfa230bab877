"""Best-of-n / rejection sampling: n answers per prompt from lmforge's engine, scored by a reward.

Input: a JSONL of prompts, one ``{"prompt": str | [messages], <fields the reward reads>...}`` a line (the task file
format of ``lmforge grpo``; a missing field is an error naming ``file:line: field``).  All ``n x prompts`` requests go
to one engine at once (continuous batching); the n copies of a prompt share its cached keys/values, so a prompt is
computed once, not n times.

Outputs in the folder:

* ``best.jsonl``: per prompt the highest-reward answer as an SFT record ``{"messages": [..., assistant]}`` (what
  ``lmforge sft --data`` reads); with ``min_reward`` only answers scoring at least that (rejection sampling);
* ``pairs.jsonl``: per prompt ``{"prompt", "chosen": best, "rejected": worst}`` when best beats worst by more than
  ``min_margin`` (what ``lmforge dpo --data`` reads);
* ``samples.jsonl``: every answer with its reward and per-component scores;
* the manifest's metrics: reward means, failures, and token accounting (prompt tokens as requested, prompt tokens
  actually computed after the prefix cache, completion tokens, tokens/s).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from lmforge.artifacts import Manifest, atomic_path
from lmforge.config import StageConfig
from lmforge.progress import console
from lmforge.rl import tasks as T
from lmforge.rl.rewards import Reward, parse_spec, required_fields
from lmforge.stages import begin, finished

STAGE = "sample"
VERSION = "1"


class Config(StageConfig):
    """Best-of-n sampling: n scored answers per prompt → best answers (SFT JSONL) and best/worst pairs (DPO JSONL)."""

    model: str = Field(description="Model folder to sample from.")
    prompts: str = Field(description="JSONL: {prompt: str | [messages], <fields the reward reads>}.")
    reward: str = Field(description="Reward spec: name[:weight],... or module:function (see lmforge.rl.rewards).")
    n: int = Field(8, ge=1, description="Answers per prompt.")
    max_tokens: int = Field(256, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    min_reward: float | None = Field(None, description="Rejection sampling: keep a best answer only at this reward "
                                                       "or above.")
    min_margin: float = Field(0.0, ge=0, description="Write a pair only when best - worst exceeds this.")
    max_num_seqs: int = Field(16, ge=1, description="Answers generated concurrently.")
    max_model_len: int = Field(2048, ge=16, description="Engine context (prompt + answer).")
    dtype: str = Field("float32", description="Engine weights: float32 or bfloat16.")
    quantize: str | None = Field(None, description="Engine weight quantisation: int8 or int4.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    seed: int = Field(0, description="Sampling seed (answer j of prompt i uses a seed derived from it).")


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"model": config.model, "prompts": config.prompts},
                 force=force)
    if run_ is None:
        return finished(out)
    with run_:
        run_.metrics.update(sample(config, out))
    return finished(out)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def sample(cfg: Config, out: Path) -> dict:
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    reward = Reward(parse_spec(cfg.reward))
    items = T.read_items(cfg.prompts, required_fields(reward.components))
    engine = Engine.from_folder(cfg.model, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                                dtype=cfg.dtype, quantize=cfg.quantize)
    prompt_ids = []
    for i, it in enumerate(items):
        ids = engine.encode_chat(it.messages())
        if len(ids) + cfg.max_tokens > engine.max_model_len:
            raise T.TaskError(f"{cfg.prompts}: prompt {i + 1} is {len(ids)} tokens; with max_tokens {cfg.max_tokens} "
                              f"it does not fit the context of {engine.max_model_len} (max_model_len)")
        prompt_ids.append(ids)
    stop = list(engine.chat_stop_token_ids)
    requests = [(i, j) for i in range(len(items)) for j in range(cfg.n)]
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             stop_token_ids=stop, seed=_seed(cfg.seed, i, j)) for i, j in requests]
    console.print(f"  {len(items)} prompts x {cfg.n} answers, reward {cfg.reward}")
    t0 = time.time()
    results = engine.generate_batch([prompt_ids[i] for i, _ in requests], params)
    seconds = time.time() - t0

    scores = [[None] * cfg.n for _ in items]
    texts = [[None] * cfg.n for _ in items]
    for (i, j), res in zip(requests, results):
        it = items[i]
        prompt_text = it.prompt if isinstance(it.prompt, str) else it.messages()[-1]["content"]
        scores[i][j] = reward.score(prompt_text, res.text, it.fields)
        texts[i][j] = res
    n_best = n_pairs = 0
    best_rewards, all_rewards = [], []
    with atomic_path(out / "best.jsonl") as b_tmp, atomic_path(out / "pairs.jsonl") as p_tmp, \
            atomic_path(out / "samples.jsonl") as s_tmp:
        with open(b_tmp, "w") as bf, open(p_tmp, "w") as pf, open(s_tmp, "w") as sf:
            for i, it in enumerate(items):
                totals = [s.total for s in scores[i]]
                all_rewards += totals
                for j in range(cfg.n):
                    sf.write(json.dumps({"prompt_index": i, "sample": j, "completion": texts[i][j].text,
                                         "reward": totals[j], "parts": scores[i][j].parts,
                                         "failed": scores[i][j].failed,
                                         "completion_tokens": texts[i][j].completion_tokens}) + "\n")
                ok = [j for j in range(cfg.n) if not scores[i][j].failed]
                if not ok:
                    continue
                best = max(ok, key=lambda j: (totals[j], -j))
                worst = min(ok, key=lambda j: (totals[j], j))
                best_rewards.append(totals[best])
                if cfg.min_reward is None or totals[best] >= cfg.min_reward:
                    bf.write(json.dumps({"messages": it.messages() + [
                        {"role": "assistant", "content": texts[i][best].text}]}) + "\n")
                    n_best += 1
                if totals[best] - totals[worst] > cfg.min_margin:
                    pf.write(json.dumps({"prompt": it.prompt, "chosen": texts[i][best].text,
                                         "rejected": texts[i][worst].text}) + "\n")
                    n_pairs += 1
    completion_tokens = sum(r.completion_tokens for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    console.print(f"  reward mean {np.mean(all_rewards):.3f}, best-of-{cfg.n} mean "
                  f"{np.mean(best_rewards) if best_rewards else float('nan'):.3f}; {n_best} best answers, "
                  f"{n_pairs} pairs; {completion_tokens} completion tokens in {seconds:.1f}s")
    return {
        "prompts": len(items), "samples": len(results), "best_written": n_best, "pairs_written": n_pairs,
        "reward_mean": round(float(np.mean(all_rewards)), 4),
        "reward_best_mean": round(float(np.mean(best_rewards)), 4) if best_rewards else None,
        "reward_failures": dict(reward.failures),
        "prompt_tokens": prompt_tokens, "prompt_tokens_computed": engine.prefill_tokens_computed,
        "prefix_cache_hit_tokens": engine.prefix_cache_hits, "completion_tokens": completion_tokens,
        "seconds": round(seconds, 2), "completion_tokens_per_s": round(completion_tokens / max(seconds, 1e-9), 1),
    }
