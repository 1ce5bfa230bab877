"""BFCL multi-turn: lmforge's agent loop against the Python simulators of BFCL's APIs (file system, math, messaging,
posting, ticketing, trading, travel, vehicle control), scored by bfcl-eval's own ``multi_turn_checker``.

Per entry: the involved classes' functions become agent tools (BFCL's docs → JSON Schema, as ``eval-bfcl``); each
user turn runs the agent (calls one after another, in order: the simulators keep state) and every tool call is
executed on the live simulator with bfcl-eval's ``execute_multi_turn_func_call``, its result going back to the model;
the trajectory (turns → model steps → call strings such as ``cd(folder='document')``) is what BFCL's handlers decode
and what its checker replays against the ground truth (state and results after every turn).

Categories: ``multi_turn_base``, ``multi_turn_long_context``, ``multi_turn_miss_param`` (a request lacks a parameter;
the user gives it in a later turn, and the turn without it has an empty ground truth) and ``multi_turn_miss_func``
(functions are withheld and added at a later turn).  The tool set is bfcl-eval's own
(``populate_test_cases_with_predefined_functions``: every function of the involved classes, the ``missed_function``
ones held out); at a turn listed in ``missed_function`` the held-out functions join the tools and the (empty) user
turn becomes BFCL's ``DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC``, as bfcl-eval's base handler does.  A turn that
reaches ``max_steps`` model calls ends the entry (BFCL's force quit after ``MAXIMUM_STEP_LIMIT`` steps); the runner
then scores it ``multi_turn:force_terminated``, as bfcl-eval's eval runner does (a model error:
``multi_turn:inference_error``).

``lmforge eval-bfcl --categories multi_turn_base ...`` runs these in the eval-bfcl stage (manifest, results.json,
items.jsonl with each trajectory).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

from lmforge.agent.backends import ModelBackend
from lmforge.agent.loop import Agent
from lmforge.agent.tools import FunctionTool
from lmforge.eval.bfcl import _read_jsonl, data_dir, to_openai_tool

CATEGORIES = ("multi_turn_base", "multi_turn_long_context", "multi_turn_miss_param", "multi_turn_miss_func")


def load_entries(category: str = "multi_turn_base", limit: int | None = None) -> list[dict]:
    """Entries with their ground truth (``entry["ground_truth"]``: per turn, the call strings), their function docs
    (``entry["function"]``) and, for miss_func, the held-out docs per turn (``entry["missed_function"]``), as
    bfcl-eval populates them."""
    from bfcl_eval.utils import populate_test_cases_with_predefined_functions

    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    root = data_dir() / "data"
    entries = _read_jsonl(root / f"BFCL_v4_{category}.json")[:limit]
    truth = {r["id"]: r["ground_truth"] for r in _read_jsonl(root / "possible_answer" / f"BFCL_v4_{category}.json")}
    for e in entries:
        e["ground_truth"] = truth[e["id"]]
    return populate_test_cases_with_predefined_functions(entries)


def function_docs(entry: dict) -> list[dict]:
    """The BFCL function docs offered at the first turn (the ``missed_function`` ones held out)."""
    return list(entry["function"])


def turn_docs(entry: dict, turn: int, docs: list[dict]) -> list[dict]:
    """The docs offered at ``turn`` given those of the turn before: the held-out ones join at their turn."""
    return docs + list((entry.get("missed_function") or {}).get(str(turn), []))


def call_string(name: str, arguments: dict) -> str:
    """A call as BFCL's handlers decode it: ``name(key=repr(value), ...)``."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def run_entry(entry: dict, backend: ModelBackend, max_steps: int = 8, run_id: str | None = None) -> dict:
    """Run the agent through every user turn of ``entry`` on live simulators.  Returns ``{"id", "decoded": turns →
    steps → call strings, "trace": per turn the agent trace, "run_id", "stop": None | "force_terminated" |
    "inference_error", "error", "prompt_tokens", "completion_tokens", "seconds"}``; after a stop the remaining turns
    are not run (``decoded`` is shorter than the ground truth, as in bfcl-eval's result file)."""
    from bfcl_eval.constants.default_prompts import DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    run_id = run_id or f"lmforge_{uuid.uuid4().hex[:12]}"  # names the simulator instances of this run

    def make_tool(doc: dict) -> FunctionTool:
        name = doc["name"]

        def call(**arguments: Any) -> str:
            [result], _ = execute_multi_turn_func_call([call_string(name, arguments)], entry["initial_config"],
                                                       entry["involved_classes"], run_id, entry["id"],
                                                       long_context="long_context" in entry["id"])
            return result

        spec = to_openai_tool(doc)["function"]
        return FunctionTool.from_schema(name, spec.get("description", ""), spec["parameters"], call)

    docs = function_docs(entry)
    messages: list[dict] = []
    decoded: list[list[list[str]]] = []
    traces: list[list[dict]] = []
    out: dict[str, Any] = {"id": entry["id"], "run_id": run_id, "stop": None, "error": None, "prompt_tokens": 0,
                           "completion_tokens": 0}
    start = time.perf_counter()
    for i, turn in enumerate(entry["question"]):
        if str(i) in (entry.get("missed_function") or {}):  # bfcl-eval's base handler: add the held-out functions
            docs = turn_docs(entry, i, docs)
            turn = [{"role": "user", "content": DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC}]
        messages += turn
        agent = Agent(backend, tools=[make_tool(d) for d in docs], max_steps=max_steps, parallel_tools=False)
        result = agent.run(messages)
        messages = result.messages
        out["prompt_tokens"] += result.prompt_tokens
        out["completion_tokens"] += result.completion_tokens
        steps = []
        for rec in result.trace:
            if rec["type"] == "model" and rec.get("tool_calls"):
                steps.append([])
            elif rec["type"] == "tool" and rec.get("error") is None and steps:
                steps[-1].append(call_string(rec["name"], json.loads(rec["arguments"] or "{}")))
        decoded.append([s for s in steps if s])
        traces.append(result.trace)
        if result.stop_reason != "answer":  # BFCL's force quit (step limit); a model error ends it too
            out["stop"] = "force_terminated" if result.stop_reason == "max_steps" else "inference_error"
            out["error"] = result.error or result.answer
            break
    out.update(decoded=decoded, trace=traces, seconds=round(time.perf_counter() - start, 3))
    return out


def score(entry: dict, decoded: list[list[list[str]]], run_id: str | None = None, stop: str | None = None) -> dict:
    """The verdict of bfcl-eval's eval runner on a trajectory (``{"valid": bool, ...}``): a run stopped early is
    ``force_terminated`` (or ``inference_error``) as the runner says when the turns do not add up, otherwise
    bfcl-eval's ``multi_turn_checker`` decides."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    if stop == "inference_error":
        return {"valid": False, "error_type": "multi_turn:inference_error",
                "error_message": "the model failed during inference"}
    if len(decoded) != len(entry["ground_truth"]):
        return {"valid": False, "error_type": "multi_turn:force_terminated",
                "error_message": f"the model ran {len(decoded)} of {len(entry['ground_truth'])} turns"}
    name = f"{run_id or 'lmforge'}_{uuid.uuid4().hex[:8]}"  # fresh simulator instances for the replay
    try:
        return multi_turn_checker(list(decoded), entry["ground_truth"], copy.deepcopy(entry),
                                  entry["id"].rsplit("_", 1)[0], name)
    except Exception as err:  # noqa: BLE001 - a checker crash on an odd trajectory scores as invalid, with the reason
        return {"valid": False, "error_type": "multi_turn:checker_error",
                "error_message": f"{type(err).__name__}: {err}"}


def evaluate_entry(entry: dict, backend: ModelBackend, max_steps: int = 8) -> dict:
    """Run and score one entry: the record ``eval-bfcl`` writes to ``items.jsonl``."""
    run = run_entry(entry, backend, max_steps)
    res = score(entry, run["decoded"], run["run_id"], run["stop"])
    return {"id": entry["id"], "category": entry["id"].rsplit("_", 1)[0], "valid": bool(res["valid"]),
            "error_type": res.get("error_type"), "error": res.get("error_message"), "stop": run["stop"],
            "stop_error": run["error"], "decoded": run["decoded"], "turns": len(run["decoded"]),
            "prompt_tokens": run["prompt_tokens"], "completion_tokens": run["completion_tokens"],
            "seconds": run["seconds"]}
