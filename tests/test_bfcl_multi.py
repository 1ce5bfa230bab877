"""BFCL multi-turn: lmforge's agent loop on bfcl-eval's live API simulators, scored by bfcl-eval's checker — a model
replaying the ground truth is valid (its decoded trajectory scores as BFCL's own ground-truth strings do), one that
skips a turn or does the wrong thing is not, with the same verdict as the checker called directly."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

pytest.importorskip("bfcl_eval")

from lmforge.agent import ScriptedModel  # noqa: E402
from lmforge.eval.bfcl_multi import load_entries, run_entry, score  # noqa: E402


def parse_call(entry: dict, text: str) -> tuple[str, dict]:
    """A ground-truth call string as (name, keyword arguments), positional ones named from the simulator method."""
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    node = ast.parse(text, mode="eval").body
    name = node.func.id
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    if node.args:
        for cls in entry["involved_classes"]:
            method = getattr(getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[cls]), cls), name, None)
            if method is not None:
                params = [p for p in inspect.signature(method).parameters if p != "self"]
                kwargs.update({params[i]: ast.literal_eval(a) for i, a in enumerate(node.args)})
                break
    return name, kwargs


def replay_script(entry: dict, turns: list[list[str]]) -> list:
    script: list = []
    for calls in turns:
        script += [[parse_call(entry, c)] for c in calls] + ["Done."]
    return script


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return load_entries("multi_turn_base", limit=2)


def test_replaying_the_ground_truth_is_valid(entries):
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    for entry in entries:
        run = run_entry(entry, ScriptedModel(replay_script(entry, entry["ground_truth"])))
        assert [len(t) for t in run["decoded"]] == [len(t) for t in entry["ground_truth"]]
        assert score(entry, run["decoded"], run["run_id"]) == {"valid": True}
        # BFCL's own ground-truth strings, one step each, through the checker directly: the same verdict
        direct = multi_turn_checker([[[c] for c in t] for t in entry["ground_truth"]], entry["ground_truth"], entry,
                                    "multi_turn_base", "direct_check")
        assert direct == {"valid": True}
        assert len(run["trace"]) == len(entry["question"])  # one agent run per user turn


def test_a_wrong_or_missing_turn_is_invalid_as_bfcl_says(entries):
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    entry = entries[0]
    skipped = [t if i < len(entry["ground_truth"]) - 1 else [] for i, t in enumerate(entry["ground_truth"])]
    run = run_entry(entry, ScriptedModel(replay_script(entry, skipped)))
    ours = score(entry, run["decoded"], run["run_id"])
    direct = multi_turn_checker([[[c] for c in t] for t in skipped], entry["ground_truth"], entry, "multi_turn_base",
                                "direct_skip")
    assert ours["valid"] is False and ours["error_type"] == direct["error_type"] == \
        "multi_turn:empty_turn_model_response"
    wrong = [list(t) for t in entry["ground_truth"]]
    wrong[0] = wrong[0][:1]  # stops after the first call of the first turn
    run = run_entry(entry, ScriptedModel(replay_script(entry, wrong)))
    ours = score(entry, run["decoded"], run["run_id"])
    direct = multi_turn_checker([[[c] for c in t] for t in wrong], entry["ground_truth"], entry, "multi_turn_base",
                                "direct_wrong")
    assert ours["valid"] is False and ours["error_type"] == direct["error_type"]


def test_tool_results_come_from_the_live_simulator(entries):
    from lmforge.eval.bfcl_multi import function_docs

    entry = entries[0]
    model = ScriptedModel(replay_script(entry, entry["ground_truth"]))
    run = run_entry(entry, model)
    names = {t["function"]["name"] for t in model.tools_seen[0]}
    assert names == {d["name"] for d in function_docs(entry)} and not names & set(entry["excluded_function"])
    first_tool = next(r for r in run["trace"][0] if r["type"] == "tool")
    assert first_tool["name"] == parse_call(entry, entry["ground_truth"][0][0])[0]
    assert first_tool["error"] is None and "Error during execution" not in first_tool["result"]
