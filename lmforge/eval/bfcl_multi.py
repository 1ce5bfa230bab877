"""BFCL multi-turn: lmforge's agent loop against the Python simulators of BFCL's APIs (file system, math, messaging,
posting, ticketing, trading, travel, vehicle control), scored by bfcl-eval's own ``multi_turn_checker``.

Per entry: the involved classes' functions become agent tools (BFCL's docs → JSON Schema, as ``eval-bfcl``); each
user turn runs the agent (calls one after another, in order: the simulators keep state) and every tool call is
executed on the live simulator with bfcl-eval's ``execute_multi_turn_func_call``, its result going back to the model;
the trajectory (turns → model steps → call strings such as ``cd(folder='document')``) is what BFCL's handlers decode
and what its checker replays against the ground truth (state and results after every turn).  Categories:
``multi_turn_base`` and ``multi_turn_long_context`` (the ``miss_func`` / ``miss_param`` ones withhold functions and
are not run).

    PYTHONPATH=. python -m lmforge.eval.bfcl_multi --model DIR --limit 5
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from lmforge.agent.backends import ModelBackend
from lmforge.agent.loop import Agent
from lmforge.agent.tools import FunctionTool
from lmforge.eval.bfcl import _read_jsonl, data_dir, to_openai_tool, wilson_ci

CATEGORIES = ("multi_turn_base", "multi_turn_long_context")


def load_entries(category: str = "multi_turn_base", limit: int | None = None) -> list[dict]:
    """Entries with their ground truth (``entry["ground_truth"]``: per turn, the call strings)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    root = data_dir() / "data"
    entries = _read_jsonl(root / f"BFCL_v4_{category}.json")[:limit]
    truth = {r["id"]: r["ground_truth"] for r in _read_jsonl(root / "possible_answer" / f"BFCL_v4_{category}.json")}
    for e in entries:
        e["ground_truth"] = truth[e["id"]]
    return entries


def function_docs(entry: dict) -> list[dict]:
    """The BFCL function docs of the entry's classes, less its ``excluded_function``."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    excluded = set(entry.get("excluded_function") or [])
    docs = []
    for cls in entry["involved_classes"]:
        path = data_dir() / "data" / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]
        docs += [d for d in _read_jsonl(path) if d["name"] not in excluded]
    return docs


def call_string(name: str, arguments: dict) -> str:
    """A call as BFCL's handlers decode it: ``name(key=repr(value), ...)``."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def run_entry(entry: dict, backend: ModelBackend, max_steps: int = 8, run_id: str | None = None) -> dict:
    """Run the agent through every user turn of ``entry`` on live simulators.  Returns ``{"id", "decoded": turns →
    steps → call strings, "trace": per turn the agent trace, "run_id"}``."""
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

    tools = [make_tool(d) for d in function_docs(entry)]
    messages: list[dict] = []
    decoded: list[list[list[str]]] = []
    traces: list[list[dict]] = []
    for turn in entry["question"]:
        messages += turn
        agent = Agent(backend, tools=tools, max_steps=max_steps, parallel_tools=False)
        result = agent.run(messages)
        messages = result.messages
        steps = []
        for rec in result.trace:
            if rec["type"] == "model" and rec.get("tool_calls"):
                steps.append([])
            elif rec["type"] == "tool" and rec.get("error") is None and steps:
                steps[-1].append(call_string(rec["name"], json.loads(rec["arguments"] or "{}")))
        decoded.append([s for s in steps if s])
        traces.append(result.trace)
    return {"id": entry["id"], "decoded": decoded, "trace": traces, "run_id": run_id}


def score(entry: dict, decoded: list[list[list[str]]], run_id: str | None = None) -> dict:
    """bfcl-eval's multi-turn checker on a trajectory (``{"valid": bool, ...}``)."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    name = f"{run_id or 'lmforge'}_{uuid.uuid4().hex[:8]}"  # fresh simulator instances for the replay
    turns = list(decoded) + [[] for _ in range(len(entry["ground_truth"]) - len(decoded))]
    try:
        return multi_turn_checker(turns, entry["ground_truth"], entry, entry["id"].rsplit("_", 1)[0], name)
    except Exception as err:  # noqa: BLE001 - a checker crash on an odd trajectory scores as invalid, with the reason
        return {"valid": False, "error_type": "multi_turn:checker_error",
                "error_message": f"{type(err).__name__}: {err}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Model folder (in-process engine, grammar-constrained calls).")
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint instead of --model.")
    ap.add_argument("--model-name", default="default")
    ap.add_argument("--category", default="multi_turn_base", choices=CATEGORIES)
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=8, help="Model calls per user turn.")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, help="JSONL of trajectories and scores.")
    args = ap.parse_args()
    if args.base_url:
        from lmforge.agent.backends import OpenAIBackend

        backend: ModelBackend = OpenAIBackend(args.model_name, base_url=args.base_url, max_tokens=args.max_tokens)
    else:
        from lmforge.agent.backends import EngineBackend
        from lmforge.serve.engine import Engine

        backend = EngineBackend(Engine.from_folder(args.model, max_num_seqs=1, max_model_len=8192),
                                max_tokens=args.max_tokens, parallel_tool_calls=False)
    rows = []
    for entry in load_entries(args.category, args.limit):
        run = run_entry(entry, backend, args.max_steps)
        res = score(entry, run["decoded"], run["run_id"])
        rows.append({"id": entry["id"], "valid": bool(res["valid"]), "error_type": res.get("error_type"),
                     "decoded": run["decoded"]})
        print(f"{entry['id']}: {'valid' if res['valid'] else res.get('error_type')}", flush=True)
    correct = sum(r["valid"] for r in rows)
    lo, hi = wilson_ci(correct, len(rows))
    print(f"{args.category}: {correct}/{len(rows)} valid, accuracy {correct / max(1, len(rows)):.3f} "
          f"[{lo:.2f}, {hi:.2f}] (95 % Wilson)")
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
