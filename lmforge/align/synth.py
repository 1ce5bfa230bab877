"""The synth stage: generate instruction/response pairs with a model behind any OpenAI-compatible endpoint.

Self-instruct style: each task shows the model a few seed instructions (a seeded random choice, so task ``i`` always
asks the same thing) and asks for one new instruction, then asks the model to answer it.  Candidates pass quality
filters (instruction length in words, a non-empty answer, no refusal/echo of the prompt) and are deduplicated against
the seeds and each other (normalised text, and word-set Jaccard similarity).

The endpoint is ``base_url`` (our own ``lmforge serve`` or a hosted API) with the key read from the environment
variable ``api_key_env``.  Requests run ``concurrency`` at a time and are retried with exponential backoff on
connection errors, timeouts, 429 and 5xx.  Every finished task is appended to ``synth.jsonl`` (kept) or
``rejected.jsonl`` (with its reason) at once, so a killed run resumes where it stopped.  ``stats.json`` holds token
and request counts, and an estimated cost when prices are configured.

Output records are OpenAI ``messages`` JSONL, ready for ``lmforge sft``.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import Field

from lmforge.align.chat_data import read_conversations
from lmforge.artifacts import Manifest, write_json
from lmforge.config import StageConfig
from lmforge.progress import console, progress
from lmforge.stages import begin, finished

STAGE = "synth"
VERSION = "1"
T = TypeVar("T")

INSTRUCTION_PROMPT = ("Here are some example questions a user might ask an assistant:\n{examples}\n"
                      "Write one new question of the same kind. Reply with the question only.")


class Config(StageConfig):
    """Generate instruction/response pairs from seed tasks with a model behind an OpenAI-compatible endpoint."""

    base_url: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name to request.")
    seeds: str = Field(description="Chat JSONL whose user turns are the seed instructions.")
    num_tasks: int = Field(50, ge=1, description="Generation tasks (each yields at most one pair).")
    examples_per_prompt: int = Field(3, ge=1, description="Seed instructions shown per task.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="Retries per request on transient errors.")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles per retry.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(128, ge=1, description="Tokens per completion.")
    min_words: int = Field(3, ge=1, description="Shortest instruction kept (words).")
    max_words: int = Field(60, ge=1, description="Longest instruction kept (words).")
    max_similarity: float = Field(0.7, ge=0, le=1, description="Drop instructions this word-set-similar to a kept one.")
    price_in_per_mtok: float = Field(0.0, ge=0, description="Price per million prompt tokens (for the cost estimate).")
    price_out_per_mtok: float = Field(0.0, ge=0, description="Price per million completion tokens.")
    seed: int = Field(0, description="Seed for choosing the examples of each task.")


def call_with_retries(fn: Callable[[], T], max_retries: int, backoff_s: float,
                      on_retry: Callable[[Exception], None] | None = None) -> T:
    """``fn()``, retried on transient errors (connection, timeout, 429, 5xx) with exponential backoff."""
    import openai

    for attempt in range(max_retries + 1):
        try:
            return fn()
        except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                openai.InternalServerError) as err:
            if attempt == max_retries:
                raise
            if on_retry:
                on_retry(err)
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def jaccard(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / max(1, len(x | y))


class Deduper:
    """Exact (normalised) and near (word-set Jaccard) duplicate detection; thread-safe."""

    def __init__(self, max_similarity: float) -> None:
        self.max_similarity = max_similarity
        self.seen: list[str] = []
        self.exact: set[str] = set()
        self.lock = threading.Lock()

    def add_if_new(self, text: str) -> str | None:
        """None when ``text`` was new (and is now remembered), else the reason it is a duplicate."""
        key = normalise(text)
        with self.lock:
            if key in self.exact:
                return "duplicate"
            if any(jaccard(key, s) >= self.max_similarity for s in self.seen):
                return "near_duplicate"
            self.exact.add(key)
            self.seen.append(key)
            return None


def clean_instruction(text: str) -> str:
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    return re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", text).strip()


class Synthesizer:
    def __init__(self, cfg: Config, seeds: list[str], stats: dict[str, Any]) -> None:
        from openai import OpenAI

        self.cfg, self.seeds, self.stats = cfg, seeds, stats
        self.client = OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "none",
                             max_retries=0, timeout=cfg.timeout_s)
        self.dedup = Deduper(cfg.max_similarity)
        for s in seeds:
            self.dedup.add_if_new(s)
        self.lock = threading.Lock()

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def chat(self, messages: list[dict[str, str]]) -> str:
        def once():
            self._count("requests")
            return self.client.chat.completions.create(model=self.cfg.model, messages=messages,
                                                       temperature=self.cfg.temperature,
                                                       max_tokens=self.cfg.max_tokens)

        resp = call_with_retries(once, self.cfg.max_retries, self.cfg.backoff_s, lambda e: self._count("retries"))
        if resp.usage:
            self._count("prompt_tokens", resp.usage.prompt_tokens)
            self._count("completion_tokens", resp.usage.completion_tokens)
        return resp.choices[0].message.content or ""

    def task(self, i: int) -> dict[str, Any]:
        """One task: ``{"task", "messages"}`` when kept, else ``{"task", "reason", ...}``."""
        rng = random.Random(f"{self.cfg.seed}:{i}")
        shown = rng.sample(self.seeds, min(self.cfg.examples_per_prompt, len(self.seeds)))
        prompt = INSTRUCTION_PROMPT.format(examples="\n".join(f"- {s}" for s in shown))
        try:
            instruction = clean_instruction(self.chat([{"role": "user", "content": prompt}]))
        except Exception as err:  # noqa: BLE001 - a failed request is recorded, never fatal for the run
            return {"task": i, "reason": "request_failed", "error": f"{type(err).__name__}: {err}"}
        words = len(instruction.split())
        if words < self.cfg.min_words:
            return {"task": i, "reason": "instruction_too_short", "instruction": instruction}
        if words > self.cfg.max_words:
            return {"task": i, "reason": "instruction_too_long", "instruction": instruction}
        dup = self.dedup.add_if_new(instruction)
        if dup:
            return {"task": i, "reason": dup, "instruction": instruction}
        try:
            answer = self.chat([{"role": "user", "content": instruction}]).strip()
        except Exception as err:  # noqa: BLE001
            return {"task": i, "reason": "request_failed", "error": f"{type(err).__name__}: {err}"}
        if not answer:
            return {"task": i, "reason": "empty_answer", "instruction": instruction}
        if normalise(answer) == normalise(instruction):
            return {"task": i, "reason": "answer_echoes_instruction", "instruction": instruction}
        return {"task": i, "messages": [{"role": "user", "content": instruction},
                                        {"role": "assistant", "content": answer}],
                "source": f"synth:{self.cfg.model}"}


def _done_tasks(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that task is redone
            pass
    return out


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"seeds": config.seeds}, force=force)
    if run_ is None:
        return finished(out)
    resume = run_.resumable()
    with run_:
        if not resume:
            for stale in ("synth.jsonl", "rejected.jsonl", "stats.json"):
                (out / stale).unlink(missing_ok=True)
        run_.metrics.update(synthesize(config, out))
    return finished(out)


def synthesize(cfg: Config, out: Path) -> dict[str, Any]:
    seeds = [c.messages[0]["content"] if c.messages[0]["role"] == "user" else c.messages[1]["content"]
             for c in read_conversations(cfg.seeds)]
    if not seeds:
        raise ValueError(f"{cfg.seeds}: no seed instruction")
    kept_path, rejected_path, stats_path = out / "synth.jsonl", out / "rejected.jsonl", out / "stats.json"
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats.pop("reasons", None)
    kept, rejected = _done_tasks(kept_path), _done_tasks(rejected_path)
    synth = Synthesizer(cfg, seeds, stats)
    for rec in kept:  # resumed: earlier instructions count for dedup
        synth.dedup.add_if_new(rec["messages"][0]["content"])
    done = {r["task"] for r in kept + rejected}
    todo = [i for i in range(cfg.num_tasks) if i not in done]
    console.print(f"  {len(seeds)} seeds, {cfg.num_tasks} tasks ({len(done)} already done), "
                  f"concurrency {cfg.concurrency}, endpoint {cfg.base_url}")
    write_lock = threading.Lock()
    t0 = time.time()
    with open(kept_path, "a", encoding="utf-8") as kf, open(rejected_path, "a", encoding="utf-8") as rf, \
            progress() as bar, ThreadPoolExecutor(cfg.concurrency) as pool:
        task_bar = bar.add_task("synth", total=cfg.num_tasks, completed=len(done), rate="")
        for rec in pool.map(synth.task, todo):
            with write_lock:
                f = kf if "messages" in rec else rf
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                (kept if "messages" in rec else rejected).append(rec)
                write_json(stats_path, stats)
            bar.update(task_bar, advance=1, rate=f"{len(kept)} kept")
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    cost = (stats.get("prompt_tokens", 0) * cfg.price_in_per_mtok +
            stats.get("completion_tokens", 0) * cfg.price_out_per_mtok) / 1e6
    stats.update({"tasks": cfg.num_tasks, "kept": len(kept), "rejected": len(rejected), "reasons": reasons,
                  "cost_usd": round(cost, 6), "seconds_this_run": round(time.time() - t0, 2)})
    write_json(stats_path, stats)
    return stats
