"""The synth stage: a model behind any OpenAI-compatible endpoint makes or labels training data.

Four modes (``mode``):

* ``generate``: new instruction/response pairs from seed tasks (below), written as OpenAI ``messages`` records;
* ``grade``: each conversation of ``data`` is graded by the model with a ``rubric``; it must answer with a JSON object
  ``{"score": int, "reason": str}`` (parsed robustly: code fences and text around the object are ignored; an
  unparseable or out-of-range answer is asked again up to ``max_parse_retries`` times, then the record is rejected).
  Kept records are the conversation plus ``score`` and ``grade_reason`` (records under ``min_score`` are rejected);
* ``prefs``: for each conversation of ``data``, the prompt (everything before the last assistant turn) is answered
  twice, at ``temperatures[0]`` and ``temperatures[1]`` with different seeds; a judge (``judge_model``, default the
  same model) sees both answers in a seeded random order and answers ``{"better": "A"|"B", "reason": str}``.  Kept
  records are DPO-ready: ``{"prompt", "chosen", "rejected", "judge_reason"}`` (``lmforge dpo`` reads them).
* ``tools``: function-calling conversations from a list of tool schemas (``tools``: a JSON list of OpenAI tools, or
  JSONL with one per line).  Per task (seeded): one tool is the target and 2-4 others are offered beside it; the model
  writes a user request that needs the target, answers it with ``tools`` and ``tool_choice="required"`` (calls whose
  arguments do not validate against their tool's ``parameters`` are rejected), plays each called function returning
  a JSON result (``response_format: json_object``), and writes the final answer with ``tool_choice="none"``.  Kept
  records are ``{"tools", "messages"}`` as ``lmforge sft`` reads them (the endpoint must serve ``tools`` and
  ``response_format``, as ``lmforge serve`` does).

Generate mode, self-instruct style: each task shows the model a few seed instructions (a seeded random choice, so task ``i`` always
asks the same thing) and asks for one new instruction, then asks the model to answer it.  Candidates pass quality
filters (instruction length in words, a non-empty answer, no refusal/echo of the prompt) and are deduplicated against
the seeds and each other (normalised text, and word-set Jaccard similarity).

The endpoint is ``base_url`` (our own ``lmforge serve`` or a hosted API) with the key read from the environment
variable ``api_key_env``.  Requests run ``concurrency`` at a time and are retried with exponential backoff on
connection errors, timeouts, 429 and 5xx.  Every finished task is appended to ``synth.jsonl`` (kept) or
``rejected.jsonl`` (with its reason) at once, so a killed run resumes where it stopped.  ``stats.json`` holds token
and request counts, and an estimated cost when prices are configured.

Every mode writes ``synth.jsonl`` (kept), ``rejected.jsonl`` and ``stats.json``; generate/grade output is ready
for ``lmforge sft``, prefs output for ``lmforge dpo``.
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
from typing import Any, Callable, Literal, TypeVar

from pydantic import Field, model_validator

from lmforge.align.chat_data import DataStats, read_conversations
from lmforge.artifacts import Manifest, write_json
from lmforge.config import StageConfig
from lmforge.progress import console, progress
from lmforge.stages import begin, finished

STAGE = "synth"
VERSION = "1"
T = TypeVar("T")

DEFAULT_RUBRIC = ("5: correct, helpful and clearly written; 4: correct with minor flaws; 3: partly correct or vague; "
                  "2: mostly unhelpful or wrong; 1: wrong, off-topic or harmful.")
GRADE_PROMPT = ("Grade the assistant's last answer in this conversation with the rubric.\n\nRubric:\n{rubric}\n\n"
                "Conversation:\n{conversation}\n\nReply with JSON only, exactly like "
                '{{"score": <integer {lo}-{hi}>, "reason": "<one sentence>"}}.')
JUDGE_PROMPT = ("Two assistants answered the same conversation. Which answer is better (more correct, helpful and "
                "clear)?\n\nConversation:\n{conversation}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
                'Reply with JSON only, exactly like {{"better": "A" or "B", "reason": "<one sentence>"}}.')
INSTRUCTION_PROMPT = ("Here are some example questions a user might ask an assistant:\n{examples}\n"
                      "Write one new question of the same kind. Reply with the question only.")
TOOL_REQUEST_PROMPT = ("Here is a function an assistant can call:\n{tool}\n"
                       "Write one realistic request from a user that needs this function. Give concrete values for "
                       "its arguments. Reply with the request only.")
TOOL_RESULT_PROMPT = ("You are the function `{name}` ({description}). It was called with these arguments:\n{arguments}"
                      "\nReply with the JSON object it returns, realistic and short, and nothing else.")


class Config(StageConfig):
    """Generate, grade or build preference pairs with a model behind an OpenAI-compatible endpoint."""

    base_url: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name to request.")
    mode: Literal["generate", "grade", "prefs", "tools"] = Field(
        "generate", description="generate: new pairs from seeds; grade: score data with a rubric; "
                                "prefs: two answers per prompt of data + a judge → DPO pairs; "
                                "tools: function-calling conversations from tool schemas.")
    tools: str | None = Field(None, description="OpenAI tools as a JSON list or JSONL, one per line (tools).")
    seeds: str | None = Field(None, description="Chat JSONL whose user turns are the seed instructions (generate).")
    data: str | None = Field(None, description="Chat JSONL to grade (grade) or whose prompts to answer (prefs).")
    rubric: str = Field(DEFAULT_RUBRIC, description="Grading rubric shown to the grader (grade).")
    min_score: int = Field(1, description="Graded records scoring below this are rejected (grade).")
    max_score: int = Field(5, ge=1, description="Top of the score scale; scores must lie in 1..max_score (grade).")
    judge_model: str | None = Field(None, description="Model that grades/judges (default: model).")
    temperatures: list[float] = Field(default_factory=lambda: [0.3, 1.0], min_length=2, max_length=2,
                                      description="Sampling temperatures of the two answers (prefs).")
    max_parse_retries: int = Field(2, ge=0, description="Re-asks when a grade/judgement is not valid JSON.")
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

    @model_validator(mode="after")
    def _inputs_for_mode(self) -> "Config":
        need = {"generate": "seeds", "tools": "tools"}.get(self.mode, "data")
        if getattr(self, need) is None:
            raise ValueError(f"mode {self.mode!r} needs {need!r}")
        return self


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


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's answer (code fences and surrounding prose ignored), or None."""
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_grade(text: str, max_score: int) -> dict[str, Any] | None:
    """``{"score": int, "reason": str}`` from a grader's answer, or None when absent or out of range."""
    obj = parse_json_object(text)
    if obj is None:
        return None
    score = obj.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= max_score:
        return None
    return {"score": score, "reason": str(obj.get("reason", "")).strip()}


def parse_verdict(text: str) -> dict[str, str] | None:
    """``{"better": "A"|"B", "reason": str}`` from a judge's answer, or None."""
    obj = parse_json_object(text)
    if obj is None:
        return None
    better = str(obj.get("better", "")).strip().upper()
    if better not in ("A", "B"):
        return None
    return {"better": better, "reason": str(obj.get("reason", "")).strip()}


def render_conversation(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def clean_instruction(text: str) -> str:
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    return re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", text).strip()


class Synthesizer:
    def __init__(self, cfg: Config, seeds: list[str], stats: dict[str, Any]) -> None:
        from openai import OpenAI

        self.cfg, self.seeds, self.stats = cfg, seeds, stats
        self.records: list[list[dict[str, str]]] = []
        self.tools: list[dict] = []
        self.client = OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "none",
                             max_retries=0, timeout=cfg.timeout_s)
        self.dedup = Deduper(cfg.max_similarity)
        for s in seeds:
            self.dedup.add_if_new(s)
        self.lock = threading.Lock()

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def chat(self, messages: list[dict[str, str]], temperature: float | None = None, seed: int | None = None,
             model: str | None = None) -> str:
        def once():
            self._count("requests")
            extra = {"seed": seed} if seed is not None else {}
            return self.client.chat.completions.create(
                model=model or self.cfg.model, messages=messages, max_tokens=self.cfg.max_tokens,
                temperature=self.cfg.temperature if temperature is None else temperature, **extra)

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


    def tools_task(self, i: int) -> dict[str, Any]:
        """A function-calling conversation around tool ``i % len(tools)`` (see the module docstring)."""
        import jsonschema

        rng = random.Random(f"{self.cfg.seed}:tools:{i}")
        target = self.tools[i % len(self.tools)]
        others = [t for t in self.tools if t is not target]
        offered = [target] + rng.sample(others, min(len(others), rng.randrange(2, 5)))
        rng.shuffle(offered)
        specs = {t["function"]["name"]: t["function"] for t in offered}
        seed = (self.cfg.seed * 1_000_003 + i) * 4
        try:
            request = clean_instruction(self.chat([{"role": "user", "content": TOOL_REQUEST_PROMPT.format(
                tool=json.dumps(target, ensure_ascii=False))}], seed=seed))
            if len(request.split()) < self.cfg.min_words:
                return {"task": i, "reason": "request_too_short", "request": request}
            messages: list[dict[str, Any]] = [{"role": "user", "content": request}]
            call_msg = self.respond(messages, tools=offered, tool_choice="required", seed=seed + 1)
            calls = call_msg.tool_calls or []
            if not calls:
                return {"task": i, "reason": "no_tool_call", "request": request}
            for c in calls:
                fn = specs.get(c.function.name)
                if fn is None:
                    return {"task": i, "reason": "unknown_tool", "request": request}
                try:
                    jsonschema.validate(json.loads(c.function.arguments), fn.get("parameters") or {})
                except (ValueError, jsonschema.ValidationError):
                    return {"task": i, "reason": "invalid_arguments", "request": request,
                            "arguments": c.function.arguments[:500]}
            messages.append({"role": "assistant", "content": call_msg.content, "tool_calls": [
                {"id": f"call_{i}_{k}", "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for k, c in enumerate(calls)]})
            for k, c in enumerate(calls):
                fn = specs[c.function.name]
                result = self.respond([{"role": "user", "content": TOOL_RESULT_PROMPT.format(
                    name=fn["name"], description=fn.get("description", ""), arguments=c.function.arguments)}],
                    response_format={"type": "json_object"}, seed=seed + 2 + k).content or ""
                if parse_json_object(result) is None:
                    return {"task": i, "reason": "unparseable_tool_result", "raw": result[:500]}
                messages.append({"role": "tool", "tool_call_id": f"call_{i}_{k}", "content": result.strip()})
            answer = (self.respond(messages, tools=offered, tool_choice="none", seed=seed + 3).content or "").strip()
        except Exception as err:  # noqa: BLE001 - a failed request is recorded, never fatal for the run
            return {"task": i, "reason": "request_failed", "error": f"{type(err).__name__}: {err}"}
        if not answer:
            return {"task": i, "reason": "empty_answer", "request": request}
        messages.append({"role": "assistant", "content": answer})
        return {"task": i, "tools": offered, "messages": messages, "source": f"synth:{self.cfg.model}"}

    def respond(self, messages: list[dict[str, Any]], seed: int | None = None, **kwargs: Any):
        """One chat completion's message, with extra request fields (tools, tool_choice, response_format)."""
        def once():
            self._count("requests")
            return self.client.chat.completions.create(model=self.cfg.model, messages=messages,
                                                       max_tokens=self.cfg.max_tokens,
                                                       temperature=self.cfg.temperature, seed=seed, **kwargs)

        resp = call_with_retries(once, self.cfg.max_retries, self.cfg.backoff_s, lambda e: self._count("retries"))
        if resp.usage:
            self._count("prompt_tokens", resp.usage.prompt_tokens)
            self._count("completion_tokens", resp.usage.completion_tokens)
        return resp.choices[0].message

    def ask_json(self, prompt: str, parse: Callable[[str], T | None], seed: int) -> tuple[T | None, str]:
        """Ask the judge model until ``parse`` accepts its answer (at most ``1 + max_parse_retries`` asks)."""
        judge = self.cfg.judge_model or self.cfg.model
        text = ""
        for attempt in range(self.cfg.max_parse_retries + 1):
            if attempt:
                self._count("parse_retries")
            text = self.chat([{"role": "user", "content": prompt}], seed=seed * 100 + attempt, model=judge)
            parsed = parse(text)
            if parsed is not None:
                return parsed, text
        return None, text

    def grade_task(self, i: int) -> dict[str, Any]:
        messages = self.records[i]
        prompt = GRADE_PROMPT.format(rubric=self.cfg.rubric, conversation=render_conversation(messages),
                                     lo=1, hi=self.cfg.max_score)
        try:
            grade, raw = self.ask_json(prompt, lambda t: parse_grade(t, self.cfg.max_score), self.cfg.seed + i)
        except Exception as err:  # noqa: BLE001
            return {"task": i, "reason": "request_failed", "error": f"{type(err).__name__}: {err}"}
        if grade is None:
            return {"task": i, "reason": "unparseable_grade", "raw": raw[:500]}
        graded = {"messages": messages, "score": grade["score"], "grade_reason": grade["reason"]}
        if grade["score"] < self.cfg.min_score:
            return {"task": i, "reason": "low_score", **graded}
        return {"task": i, **graded, "grader": self.cfg.judge_model or self.cfg.model}

    def prefs_task(self, i: int) -> dict[str, Any]:
        messages = self.records[i]
        last_user = max(k for k, m in enumerate(messages) if m["role"] == "user")
        prompt = messages[:last_user + 1]
        base_seed = (self.cfg.seed * 1_000_003 + i) * 2
        try:
            answers = [self.chat(prompt, temperature=t, seed=base_seed + k).strip()
                       for k, t in enumerate(self.cfg.temperatures)]
        except Exception as err:  # noqa: BLE001
            return {"task": i, "reason": "request_failed", "error": f"{type(err).__name__}: {err}"}
        if not all(answers):
            return {"task": i, "reason": "empty_answer"}
        if normalise(answers[0]) == normalise(answers[1]):
            return {"task": i, "reason": "identical_answers"}
        flip = random.Random(f"{self.cfg.seed}:judge:{i}").random() < 0.5  # against the judge's position bias
        a, b = (answers[1], answers[0]) if flip else (answers[0], answers[1])
        judge_prompt = JUDGE_PROMPT.format(conversation=render_conversation(prompt), a=a, b=b)
        try:
            verdict, raw = self.ask_json(judge_prompt, parse_verdict, self.cfg.seed + i)
        except Exception as err:  # noqa: BLE001
            return {"task": i, "reason": "request_failed", "error": f"{type(err).__name__}: {err}"}
        if verdict is None:
            return {"task": i, "reason": "unparseable_judgement", "raw": raw[:500]}
        chosen, rejected = (a, b) if verdict["better"] == "A" else (b, a)
        return {"task": i, "prompt": prompt if len(prompt) > 1 else prompt[0]["content"], "chosen": chosen,
                "rejected": rejected, "judge_reason": verdict["reason"],
                "judge": self.cfg.judge_model or self.cfg.model}


def read_tools(path: str | os.PathLike) -> list[dict]:
    """OpenAI tools from a JSON list or JSONL (one tool per line), validated; errors name the file (and line)."""
    from lmforge.serve.tools import ToolError, parse_tools

    text = Path(path).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
        items = [(str(path), t) for t in (raw if isinstance(raw, list) else [raw])]
    except json.JSONDecodeError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: invalid JSON: {err.msg}") from None
    tools = []
    for where, t in items:
        try:
            parse_tools(tools + [t])
        except ToolError as err:
            raise ValueError(f"{where}: {err}") from None
        tools.append(t)
    if len(tools) < 1:
        raise ValueError(f"{path}: no tool")
    return tools


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
    inputs = {k: v for k, v in (("seeds", config.seeds), ("data", config.data), ("tools", config.tools))
              if v is not None}
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force, force_resumes=True)
    if run_ is None:
        return finished(out)
    resume = run_.resumes is not None
    with run_:
        if not resume:
            for stale in ("synth.jsonl", "rejected.jsonl", "stats.json"):
                (out / stale).unlink(missing_ok=True)
        run_.metrics.update(synthesize(config, out))
    return finished(out)


def synthesize(cfg: Config, out: Path) -> dict[str, Any]:
    seeds: list[str] = []
    records: list[list[dict[str, str]]] = []
    tools: list[dict] = []
    if cfg.mode == "generate":
        seeds = [c.messages[0]["content"] if c.messages[0]["role"] == "user" else c.messages[1]["content"]
                 for c in read_conversations(cfg.seeds)]
        if not seeds:
            raise ValueError(f"{cfg.seeds}: no seed instruction")
        n_tasks = cfg.num_tasks
    elif cfg.mode == "tools":
        tools = read_tools(cfg.tools)
        n_tasks = cfg.num_tasks
    else:
        records = [c.messages for c in read_conversations(cfg.data)][:cfg.num_tasks]
        if not records:
            raise ValueError(f"{cfg.data}: no conversation")
        n_tasks = len(records)
    kept_path, rejected_path, stats_path = out / "synth.jsonl", out / "rejected.jsonl", out / "stats.json"
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats.pop("reasons", None)
    kept, rejected = _done_tasks(kept_path), _done_tasks(rejected_path)
    synth = Synthesizer(cfg, seeds, stats)
    synth.records = records
    synth.tools = tools
    if cfg.mode == "generate":
        for rec in kept:  # resumed: earlier instructions count for dedup
            synth.dedup.add_if_new(rec["messages"][0]["content"])
    work = {"generate": synth.task, "grade": synth.grade_task, "prefs": synth.prefs_task,
            "tools": synth.tools_task}[cfg.mode]
    done = {r["task"] for r in kept + rejected}
    todo = [i for i in range(n_tasks) if i not in done]
    console.print(f"  mode {cfg.mode}: {len(seeds) or len(records)} inputs, {n_tasks} tasks ({len(done)} already done), "
                  f"concurrency {cfg.concurrency}, endpoint {cfg.base_url}")
    write_lock = threading.Lock()
    t0 = time.time()
    pool = ThreadPoolExecutor(cfg.concurrency)
    try:
        with open(kept_path, "a", encoding="utf-8") as kf, open(rejected_path, "a", encoding="utf-8") as rf, \
                progress() as bar:
            task_bar = bar.add_task(f"synth ({cfg.mode})", total=n_tasks, completed=len(done), rate="")
            for rec in pool.map(work, todo):
                with write_lock:
                    ok = "reason" not in rec
                    f = kf if ok else rf
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    (kept if ok else rejected).append(rec)
                    write_json(stats_path, stats)
                bar.update(task_bar, advance=1, rate=f"{len(kept)} kept")
    except BaseException as err:  # Ctrl-C / SIGTERM / an error: requests not sent yet are cancelled, not sent
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(err, KeyboardInterrupt):
            console.print(f"[yellow]interrupted: {len(kept) + len(rejected)} of {n_tasks} tasks done; "
                          f"re-run to resume[/]")
        raise
    pool.shutdown(wait=True)
    tally = DataStats(lines=n_tasks, kept=len(kept))
    for line, r in enumerate(rejected, 1):
        tally.skip(r["reason"], f"{rejected_path}:{line}")
    tally.report("tasks (rejected)", cfg.seeds or cfg.data)
    reasons, rejected_examples = dict(tally.skipped), tally.examples
    cost = (stats.get("prompt_tokens", 0) * cfg.price_in_per_mtok +
            stats.get("completion_tokens", 0) * cfg.price_out_per_mtok) / 1e6
    stats.update({"mode": cfg.mode, "tasks": n_tasks, "kept": len(kept), "rejected": len(rejected), "reasons": reasons,
                  "rejected_examples": rejected_examples,
                  "cost_usd": round(cost, 6), "seconds_this_run": round(time.time() - t0, 2)})
    write_json(stats_path, stats)
    return stats
