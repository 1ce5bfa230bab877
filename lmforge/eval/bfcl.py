"""Function-calling evaluation on BFCL (Berkeley Function Calling Leaderboard, PyPI ``bfcl-eval``, Apache-2.0).

``lmforge eval-bfcl`` runs BFCL's single-turn AST categories (non-live: simple_python, multiple, parallel,
parallel_multiple, irrelevance; live: live_simple, live_multiple, live_parallel, live_parallel_multiple,
live_irrelevance, live_relevance) from the question and answer files that ship in ``bfcl_eval/data``:

- each question's functions become OpenAI ``tools`` (``to_openai_tool``: BFCL's Gorilla types such as ``dict``,
  ``float``, ``tuple``, ``any`` mapped to JSON Schema as BFCL's own OpenAI handler maps them);
- the model answers either in-process (``model``: an lmforge ``Engine`` on a model folder, the conversation rendered
  by ``serve.tools.render_messages`` and, with ``constrained``, decoding constrained by the ``tool_choice="auto"``
  grammar, exactly as ``lmforge serve`` does) or through any OpenAI-compatible endpoint (``base_url``: ``tools`` and
  ``tool_choice="auto"`` through the official ``openai`` client);
- the calls are decoded as BFCL decodes an OpenAI function-calling model (``[{name: json.loads(arguments)}]``) and
  scored with bfcl-eval's own AST checker; (ir)relevance items score whether any call was made, as BFCL does.

The multi-turn categories (``multi_turn_base``, ``multi_turn_long_context``, ``multi_turn_miss_param``,
``multi_turn_miss_func``) run in the same stage: lmforge's agent loop on bfcl-eval's live API simulators, scored by its
multi-turn checker (``lmforge/eval/bfcl_multi.py``; ``max_steps`` model calls per user turn).

Output: ``results.json`` (accuracy per category with a 95% Wilson CI, and the item-weighted overall),
``items.jsonl`` (one record per question: output, decoded calls, verdict and the checker's error) and ``results.md``.

bfcl-eval pins numpy 1.26.4 and many vendor SDKs, so it is installed ``--no-deps``.  Its checker module
``eval_checker/ast_eval/ast_checker.py`` imports ``constants.model_config`` only to ask whether a model's function
names had ``.`` replaced by ``_``, and that module imports every vendor SDK; ``load_ast_checker`` therefore loads the
checker's file by path with that one import line replaced by a mapping that answers "no" (names reach the checker
as BFCL spells them: ours may contain ``.``, and ``underscore_dots`` renames are undone before scoring).  Nothing is
added to or changed in the ``bfcl_eval`` package.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from lmforge.artifacts import Manifest, write_json, write_text
from lmforge.config import ConfigError, StageConfig
from lmforge.progress import console
from lmforge.stages import begin, finished

STAGE = "eval_bfcl"
VERSION = "1"

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "live_simple",
              "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance")
DATA_PREFIX = "BFCL_v4_"
MULTI_TURN = ("multi_turn_base", "multi_turn_long_context", "multi_turn_miss_param", "multi_turn_miss_func")
CHECKER_NAME = "lmforge"  # the model name the checker is given (only used to look up underscore_to_dot)

# BFCL's Gorilla types -> JSON Schema types (the same mapping as bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI
# for the Python categories we run); an unknown type becomes "string", as BFCL does.
TYPE_MAP = {"integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
            "bool": "boolean", "array": "array", "list": "array", "tuple": "array", "dict": "object",
            "object": "object", "any": "string"}


class Config(StageConfig):
    """Function-calling accuracy on BFCL's AST categories, for a model folder (in-process) or an OpenAI endpoint."""

    model: str | None = Field(None, description="Model folder (HF layout with a chat template), run in-process.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) "
                                                   "instead of a model folder.")
    model_name: str | None = Field(None, description="Model name sent to the endpoint (default: its first model).")
    api_key: str = Field("EMPTY", description="API key for the endpoint.")
    categories: list[str] = Field(default_factory=lambda: list(CATEGORIES),
                                  description="BFCL categories: " + ", ".join(CATEGORIES + MULTI_TURN) + ".")
    limit: int | None = Field(None, ge=1, description="Score at most this many questions per category (the first).")
    tool_choice: Literal["auto", "required"] = Field("auto", description="OpenAI tool_choice: auto (the model may "
                                                     "answer in text; BFCL's setting) or required (calls only).")
    parallel_tool_calls: Literal["always", "per_category"] = Field(
        "always", description="always: several calls allowed in every answer (OpenAI's default, as BFCL runs FC "
                              "models); per_category: only in the parallel categories.")
    constrained: bool = Field(True, description="In-process: constrain decoding to the tool-call format "
                                                "(the tool_choice grammar).")
    max_tokens: int = Field(256, ge=1, description="Tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature (0: greedy).")
    seed: int = Field(0, description="Sampling seed (sent to the endpoint as `seed`).")
    max_model_len: int = Field(4096, ge=256, description="In-process: context length of the engine.")
    quantize: str | None = Field(None, description="In-process: weight quantization (int8, int4).")
    concurrency: int = Field(1, ge=1, description="Questions in flight at once (in-process: the engine batches "
                                                  "them; greedy answers can then differ in the last float bits; "
                                                  "multi-turn entries run one at a time).")
    max_steps: int = Field(8, ge=1, description="Multi-turn categories: model calls per user turn; a turn that "
                                                "reaches it ends the entry (BFCL's force quit).")
    underscore_dots: bool = Field(False, description="Send function names with '.' replaced by '_' (OpenAI's name "
                                                     "rule); renames are undone before scoring.")


# -- data --------------------------------------------------------------------------------------------------------------
def data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("eval-bfcl needs the bfcl-eval package: pip install --no-deps bfcl-eval")
    return Path(list(spec.submodule_search_locations)[0])


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as err:
                raise ConfigError(f"{path}:{n}: not JSON: {err}") from None
    return out


def load_category(category: str, limit: int | None = None) -> list[dict]:
    """A category's questions, each with its ``ground_truth`` (none for (ir)relevance) and ``category``."""
    if category not in CATEGORIES:
        raise ConfigError(f"categories: unknown BFCL category {category!r} "
                          f"(known: {', '.join(CATEGORIES + MULTI_TURN)})")
    root = data_dir() / "data"
    items = _read_jsonl(root / f"{DATA_PREFIX}{category}.json")[:limit]
    answers_path = root / "possible_answer" / f"{DATA_PREFIX}{category}.json"
    if answers_path.exists():
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answers_path)}
        for it in items:
            if it["id"] not in answers:
                raise ConfigError(f"{answers_path}: no answer for question {it['id']!r}")
            it["ground_truth"] = answers[it["id"]]
    for it in items:
        it["category"] = category
    return items


def is_relevance(category: str) -> bool:
    return "relevance" in category  # irrelevance, live_irrelevance, live_relevance


# -- functions -> tools ------------------------------------------------------------------------------------------------
def _schema(node: Any) -> Any:
    """One BFCL parameter schema as JSON Schema: Gorilla types mapped, a property without a type is a string."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "type":
            out["type"] = TYPE_MAP.get(value, "string") if isinstance(value, str) else value
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {name: _property(p) for name, p in value.items()}
        elif key == "items":
            out["items"] = _property(value) if isinstance(value, dict) else value
        elif key == "optional":  # BFCL bookkeeping, not JSON Schema
            continue
        else:
            out[key] = copy.deepcopy(value)
    return out


def _property(node: dict) -> dict:
    out = _schema(node)
    out.setdefault("type", "string")
    return out


def tool_name(name: str, underscore_dots: bool) -> str:
    return re.sub(r"\.", "_", name) if underscore_dots else name


def to_openai_tool(function: dict, underscore_dots: bool = False) -> dict:
    """A BFCL function as an OpenAI tool (``parameters`` a JSON Schema object)."""
    params = _schema(function.get("parameters") or {})
    params["type"] = "object"
    params.setdefault("properties", {})
    fn = {"name": tool_name(function["name"], underscore_dots), "parameters": params}
    if function.get("description"):
        fn["description"] = function["description"]
    return {"type": "function", "function": fn}


# -- scoring -----------------------------------------------------------------------------------------------------------
class _NoRenames(dict):
    """Stands in for bfcl's MODEL_CONFIG_MAPPING: no model had '.' in function names replaced by '_'."""

    def __missing__(self, key: str) -> Any:
        return types.SimpleNamespace(underscore_to_dot=False)


_CHECKER: types.ModuleType | None = None
_MODEL_CONFIG_IMPORT = "from bfcl_eval.constants.model_config import MODEL_CONFIG_MAPPING\n"


def load_ast_checker() -> types.ModuleType:
    """bfcl-eval's ``ast_checker`` module, loaded from its file (see the module docstring for why)."""
    global _CHECKER
    if _CHECKER is None:
        path = data_dir() / "eval_checker" / "ast_eval" / "ast_checker.py"
        source = path.read_text(encoding="utf-8")
        if _MODEL_CONFIG_IMPORT not in source:
            raise RuntimeError(f"{path}: this bfcl-eval version no longer imports MODEL_CONFIG_MAPPING as expected; "
                               "update lmforge.eval.bfcl.load_ast_checker")
        module = types.ModuleType("lmforge_bfcl_ast_checker")
        module.__file__ = str(path)
        module.MODEL_CONFIG_MAPPING = _NoRenames()
        exec(compile(source.replace(_MODEL_CONFIG_IMPORT, "\n"), str(path), "exec"), module.__dict__)  # noqa: S102
        _CHECKER = module
    return _CHECKER


def decode_calls(calls: list[tuple[str, str]], names: dict[str, str]) -> list[dict]:
    """BFCL's decoding of an OpenAI function-calling answer: ``[{name: json.loads(arguments)}]``; raises on bad JSON.
    ``names`` maps sent tool names back to BFCL's."""
    return [{names.get(name, name): json.loads(args)} for name, args in calls]


def score_item(item: dict, calls: list[tuple[str, str]] | None, names: dict[str, str] | None = None) -> dict:
    """The verdict on one question for the model's calls ``[(name, arguments JSON)]`` (``None``: it made none), as
    BFCL's eval runner decides it: ``{"valid", "error", "error_type", "decoded"}``."""
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.utils import is_empty_output, is_function_calling_format_output

    category = item["category"]
    try:
        decoded = decode_calls(calls or [], names or {})
    except (ValueError, TypeError) as err:
        decoded, decode_error = None, f"Invalid syntax. Failed to decode AST. {err}"
    else:
        decode_error = None
    if is_relevance(category):
        called = decoded is not None and not is_empty_output(decoded)
        valid = not called if "irrelevance" in category else called
        error_type = None if valid else ("irrelevance_error:decoder_success" if "irrelevance" in category
                                         else "relevance_error:decoder_failed")
        return {"valid": valid, "error": [] if valid else [error_type], "error_type": error_type, "decoded": decoded}
    if decoded is None:
        return {"valid": False, "error": [decode_error], "error_type": "ast_decoder:decoder_failed", "decoded": None}
    if not is_function_calling_format_output(decoded):
        return {"valid": False, "error": ["Did not output in the specified format."],
                "error_type": "ast_decoder:decoder_wrong_output_format", "decoded": decoded}
    res = load_ast_checker().ast_checker(item["function"], decoded, item["ground_truth"], Language.PYTHON, category,
                                         CHECKER_NAME)
    valid = bool(res["valid"])
    return {"valid": valid, "error": [] if valid else res.get("error", []),
            "error_type": None if valid else res.get("error_type"), "decoded": decoded}


# -- models ------------------------------------------------------------------------------------------------------------
Answer = dict  # {"content": str | None, "calls": [(name, arguments)], "finish_reason": str}


class ItemError(ValueError):
    """The model side refused one question (a prompt longer than the context, a 400): it is scored wrong and the
    run goes on.  Anything else (the endpoint is down) ends the run."""


def load_engine(config: Config) -> Any:
    from lmforge.serve.engine import Engine

    return Engine.from_folder(config.model, max_num_seqs=config.concurrency, max_model_len=config.max_model_len,
                              quantize=config.quantize)


def engine_answerer(config: Config, engine: Any) -> tuple[Callable[..., Answer], Callable[[], None]]:
    """Answer in-process with an lmforge Engine, as ``lmforge serve`` answers ``tools`` with ``tool_choice``."""
    from lmforge.serve.sampling import SamplingParams
    from lmforge.serve.structured import StructuredOutputs
    from lmforge.serve.tools import parse_tool_calls, parse_tool_choice, parse_tools, render_messages, \
        tool_call_grammar

    structured = StructuredOutputs.for_engine(engine) if config.constrained else None

    def answer(messages: list[dict], tools: list[dict], parallel: bool) -> Answer:
        try:
            parsed = parse_tools(tools)
            choice = parse_tool_choice(config.tool_choice, parsed)
            prompt = engine.encode_chat(render_messages(messages, parsed, choice))
            engine.check_request(prompt, SamplingParams(max_tokens=config.max_tokens))
        except ValueError as err:  # a bad tool, a prompt that does not fit
            raise ItemError(f"{type(err).__name__}: {err}") from None
        procs = [structured.processor(tool_call_grammar(parsed, choice, parallel))] if structured else []
        params = SamplingParams(temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed,
                                stop_token_ids=list(engine.chat_stop_token_ids), logits_processors=procs)
        out = engine.generate_text(prompt, params)
        content, calls = parse_tool_calls(out.text)
        return {"text": out.text, "content": content, "calls": [(c.name, c.arguments) for c in calls],
                "finish_reason": out.finish_reason}

    return answer, engine.shutdown


def endpoint_answerer(config: Config) -> tuple[Callable[..., Answer], Callable[[], None]]:
    """Answer through an OpenAI-compatible endpoint with ``tools`` and ``tool_choice``."""
    from openai import APIConnectionError, BadRequestError, OpenAI

    client = OpenAI(base_url=config.base_url, api_key=config.api_key, max_retries=0)
    name = endpoint_model(config, client)

    def answer(messages: list[dict], tools: list[dict], parallel: bool) -> Answer:
        try:
            resp = client.chat.completions.create(model=name, messages=messages, tools=tools,
                                                  tool_choice=config.tool_choice, parallel_tool_calls=parallel,
                                                  temperature=config.temperature, max_tokens=config.max_tokens,
                                                  seed=config.seed)
        except BadRequestError as err:
            raise ItemError(f"{type(err).__name__}: {err}") from None
        except APIConnectionError as err:
            raise ConfigError(f"base_url: cannot reach {config.base_url}: {err}") from None
        choice = resp.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "calls": calls, "finish_reason": choice.finish_reason}

    return answer, client.close


def endpoint_model(config: Config, client: Any) -> str:
    """The model name to send: ``model_name`` or the endpoint's first model."""
    from openai import APIConnectionError

    try:
        return config.model_name or client.models.list().data[0].id
    except APIConnectionError as err:
        raise ConfigError(f"base_url: cannot reach {config.base_url}: {err}") from None


def multi_turn_backend(config: Config, engine: Any) -> Any:
    """The agent backend the multi-turn categories run on (in-process: tool calls always grammar-constrained)."""
    from lmforge.agent.backends import EngineBackend, OpenAIBackend

    if engine is not None:
        return EngineBackend(engine, temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed,
                             parallel_tool_calls=False)
    backend = OpenAIBackend("", base_url=config.base_url, api_key=config.api_key, temperature=config.temperature,
                            max_tokens=config.max_tokens)
    backend.model = backend.name = endpoint_model(config, backend.client)
    return backend


# -- the stage ---------------------------------------------------------------------------------------------------------
def evaluate_item(item: dict, answer: Callable[[list[dict], list[dict], bool], Answer], underscore_dots: bool,
                  parallel: bool = True) -> dict:
    """Ask the model one question and score it; a request the model side refuses is an invalid answer, recorded."""
    tools = [to_openai_tool(f, underscore_dots) for f in item["function"]]
    names = {tool_name(f["name"], underscore_dots): f["name"] for f in item["function"]}
    t0 = time.perf_counter()
    try:
        out = answer(item["question"][0], tools, parallel)
        request_error = None
    except ItemError as err:  # one refused question does not end the run; it is recorded and scored wrong
        out, request_error = {"content": None, "calls": None, "finish_reason": "error"}, str(err)
    verdict = score_item(item, out["calls"], names)
    if request_error:  # e.g. a prompt longer than the context: wrong, with the reason
        kind = "prompt_too_long" if "PromptTooLong" in request_error or "maximum context" in request_error \
            else "request_error"
        verdict = {**verdict, "valid": False, "error": [request_error], "error_type": kind}
    return {"id": item["id"], "category": item["category"], **verdict, **out,
            "seconds": round(time.perf_counter() - t0, 3)}


def wilson_ci(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z=1.96): unlike a bootstrap it is not [0, 0] for 0 of 3."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(records: list[dict]) -> dict:
    """Accuracy with a 95% Wilson CI per category and overall (item-weighted)."""
    out = {}
    groups: dict[str, list[float]] = {}
    for r in records:
        groups.setdefault(r["category"], []).append(float(r["valid"]))
    groups["overall"] = [float(r["valid"]) for r in records]
    for name, values in groups.items():
        lo, hi = wilson_ci(int(sum(values)), len(values))
        out[name] = {"accuracy": sum(values) / len(values) if values else float("nan"), "ci": [lo, hi],
                     "n": len(values)}
    return out


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    if (config.model is None) == (config.base_url is None):
        raise ConfigError("eval-bfcl: give exactly one of `model` (a model folder) or `base_url` (an endpoint)")
    multi = [c for c in config.categories if c in MULTI_TURN]
    items = [it for c in config.categories if c not in multi for it in load_category(c, config.limit)]  # validates
    if multi:
        from lmforge.eval import bfcl_multi

        items += [e for c in multi for e in bfcl_multi.load_entries(c, config.limit)]
    out = Path(out_dir)
    inputs = {"bfcl_data": str(data_dir() / "data")}
    if config.model:
        inputs["model"] = config.model
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force,
                 execution_fields={"api_key"})
    if run_ is None:
        return finished(out)
    with run_:
        engine = load_engine(config) if config.model else None
        answer, close = engine_answerer(config, engine) if engine else endpoint_answerer(config)
        backend = multi_turn_backend(config, engine) if multi else None
        records = []

        def one(item: dict) -> dict:
            if "ground_truth" in item and "initial_config" in item:  # a multi-turn entry
                return bfcl_multi.evaluate_entry(item, backend, config.max_steps)
            parallel = config.parallel_tool_calls == "always" or "parallel" in item["category"]
            return evaluate_item(item, answer, config.underscore_dots, parallel)

        try:
            # the simulators of multi-turn entries keep state: those run one at a time
            workers = 1 if multi else config.concurrency
            with open(out / "items.jsonl", "w", encoding="utf-8") as f, \
                    ThreadPoolExecutor(workers, thread_name_prefix="bfcl") as pool:
                # written in question order as it goes: follow a long run
                for i, record in enumerate(pool.map(one, items), 1):
                    records.append(record)
                    f.write(json.dumps(records[-1], ensure_ascii=False) + "\n")
                    f.flush()
                    if i % 10 == 0 or i == len(items) or multi:
                        console.print(f"  {i}/{len(items)} questions, {sum(r['valid'] for r in records)} correct")
        finally:
            close()
        summary = summarize(records)
        unparsed = sum(1 for r in records if r.get("calls") and r["decoded"] is None)
        write_json(out / "results.json", {"model": config.model or config.base_url, "constrained": config.constrained
                                          if config.model else None, "categories": summary,
                                          "unparsed_answers": unparsed})
        lines = ["| category | accuracy | 95% CI | n |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['accuracy']:.3f} | [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] | {v['n']} |"
                  for k, v in summary.items()]
        write_text(out / "results.md", "\n".join(lines) + "\n")
        for k, v in summary.items():
            run_.metrics[f"{k}.accuracy"] = round(v["accuracy"], 5)
        run_.metrics["unparsed_answers"] = unparsed
        console.print("\n".join(lines))
    return finished(out)
