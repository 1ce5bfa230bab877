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


def all_function_names(entry: dict) -> list[str]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING
    from lmforge.eval.bfcl import _read_jsonl, data_dir

    return [d["name"] for cls in entry["involved_classes"] for d in _read_jsonl(
        data_dir() / "data" / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls])]


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
    # bfcl-eval's own tool set: every function of the involved classes (it ignores ``excluded_function``)
    assert names == {d["name"] for d in function_docs(entry)} == set(all_function_names(entry))
    first_tool = next(r for r in run["trace"][0] if r["type"] == "tool")
    assert first_tool["name"] == parse_call(entry, entry["ground_truth"][0][0])[0]
    assert first_tool["error"] is None and "Error during execution" not in first_tool["result"]


def test_miss_func_withholds_functions_until_their_turn():
    from bfcl_eval.constants.default_prompts import DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    entry = load_entries("multi_turn_miss_func", limit=1)[0]
    [(turn, missed)] = [(int(k), [d["name"] for d in v]) for k, v in entry["missed_function"].items()]
    assert entry["question"][turn] == [] and entry["ground_truth"][turn]  # BFCL's shape: an empty user turn
    model = ScriptedModel(replay_script(entry, entry["ground_truth"]))
    run = run_entry(entry, model)
    assert score(entry, run["decoded"], run["run_id"]) == {"valid": True}
    # the model call that opens each turn: before the missed turn the functions are absent, from it on present
    firsts = [i for i, r in enumerate(model.requests) if r[-1]["role"] == "user"]
    for t, i in enumerate(firsts):
        names = {d["function"]["name"] for d in model.tools_seen[i]}
        assert set(missed) <= names if t >= turn else not set(missed) & names
        assert names <= set(all_function_names(entry))
    assert model.requests[firsts[turn]][-1]["content"] == DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC
    # skipping the added function's turn: invalid, with the checker's own error type
    skipped = [[] if t == turn else calls for t, calls in enumerate(entry["ground_truth"])]
    run = run_entry(entry, ScriptedModel(replay_script(entry, skipped)))
    ours = score(entry, run["decoded"], run["run_id"])
    direct = multi_turn_checker([[[c] for c in t] for t in skipped], entry["ground_truth"], entry,
                                "multi_turn_miss_func", "direct_miss")
    assert ours["valid"] is False and ours["error_type"] == direct["error_type"] == \
        "multi_turn:empty_turn_model_response"


def test_miss_param_asks_and_agrees_with_the_checker():
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    entry = load_entries("multi_turn_miss_param", limit=1)[0]
    assert [] in entry["ground_truth"]  # the turn that lacks a parameter: no call expected
    run = run_entry(entry, ScriptedModel(replay_script(entry, entry["ground_truth"])))
    assert score(entry, run["decoded"], run["run_id"]) == {"valid": True}
    assert multi_turn_checker([[[c] for c in t] for t in entry["ground_truth"]], entry["ground_truth"], entry,
                              "multi_turn_miss_param", "direct_param") == {"valid": True}
    # guessing the missing parameter instead of asking: the state after the next turn differs
    t = entry["ground_truth"].index([])
    guessed = [list(c) for c in entry["ground_truth"]]
    guessed[t] = list(entry["ground_truth"][t + 1])
    guessed[t + 1] = []
    run = run_entry(entry, ScriptedModel(replay_script(entry, guessed)))
    ours = score(entry, run["decoded"], run["run_id"])
    direct = multi_turn_checker([[[c] for c in t] for t in guessed], entry["ground_truth"], entry,
                                "multi_turn_miss_param", "direct_guess")
    assert ours["valid"] is False and ours["error_type"] == direct["error_type"]


def test_step_limit_ends_the_entry_as_bfcl_force_quits(entries):
    entry = entries[0]
    first = parse_call(entry, entry["ground_truth"][0][0])
    run = run_entry(entry, ScriptedModel([[first]] * 3), max_steps=3)  # calls at every step of the first turn
    assert run["stop"] == "force_terminated" and len(run["decoded"]) == 1 and len(run["decoded"][0]) == 3
    verdict = score(entry, run["decoded"], run["run_id"], run["stop"])
    assert verdict["valid"] is False and verdict["error_type"] == "multi_turn:force_terminated"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("xgrammar")
    from test_serve import _build_serve_model

    folder = tmp_path_factory.mktemp("bfclmt") / "tiny"
    _build_serve_model(folder, 16384)  # BFCL's file-system docs are ~6k tokens for this 512-token vocabulary
    return folder


def test_eval_bfcl_command_runs_multi_turn_categories(tiny_model, tmp_path):
    """``lmforge eval-bfcl --categories multi_turn_*``: the agent on the live simulators, one record per entry with
    its trajectory and the runner's verdict, the category's accuracy in results.json, a manifest."""
    import json

    from typer.testing import CliRunner

    from lmforge.cli import app

    out = tmp_path / "mt"
    res = CliRunner().invoke(app, ["eval-bfcl", "--model", str(tiny_model), "--categories", "multi_turn_miss_func",
                                   "--limit", "2", "--max-steps", "1", "--max-tokens", "12", "--temperature", "1",
                                   "--max-model-len", "8192", "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    entries = {e["id"]: e for e in load_entries("multi_turn_miss_func", limit=2)}
    assert [r["id"] for r in records] == list(entries)
    for r in records:
        if r["stop"] == "inference_error":  # entry 0's two APIs do not fit 8192 tokens: recorded, scored wrong
            assert "context" in r["stop_error"] and r["error_type"] == "multi_turn:inference_error"
        else:  # a random model: whatever it did is replayed by the checker
            assert r["prompt_tokens"] > 0 and r["turns"] >= 1
            assert r["valid"] == score(entries[r["id"]], r["decoded"], None, r["stop"])["valid"]
    assert {r["stop"] for r in records} != {"inference_error"}
    results = json.loads((out / "results.json").read_text())
    assert results["categories"]["multi_turn_miss_func"]["n"] == 2
    assert json.loads((out / "manifest.json").read_text())["stage"] == "eval_bfcl"
    bad = CliRunner().invoke(app, ["eval-bfcl", "--model", str(tiny_model), "--categories", "multi_turn_nope",
                                   "--out", str(tmp_path / "bad")])
    from lmforge.config import ConfigError

    assert isinstance(bad.exception, ConfigError) and "unknown BFCL category 'multi_turn_nope'" in str(bad.exception)
