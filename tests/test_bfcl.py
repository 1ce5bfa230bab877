"""BFCL function-calling evaluation (``lmforge eval-bfcl``): our verdicts on hand-made answers to real BFCL questions
equal those of bfcl-eval's own AST checker imported through its package and driven the way its eval runner drives an
OpenAI function-calling model; and end-to-end runs (``--limit 2`` per category) on a tiny random model, in-process
with constrained decoding and through a real ``lmforge`` server, produce calls that all parse."""

from __future__ import annotations

import importlib
import json
import sys
import types

import jsonschema
import pytest
from test_serve import _build_serve_model
from typer.testing import CliRunner

pytest.importorskip("bfcl_eval")
pytest.importorskip("xgrammar")

from lmforge.eval import bfcl  # noqa: E402

AST_CATEGORIES = [c for c in bfcl.CATEGORIES if not bfcl.is_relevance(c)]
REL_CATEGORIES = [c for c in bfcl.CATEGORIES if bfcl.is_relevance(c)]


@pytest.fixture(scope="module")
def bfcl_own():
    """bfcl-eval's ``ast_checker`` module and utils, imported the normal way.  Its ``constants.model_config`` imports
    every vendor SDK (not installed: bfcl-eval is installed --no-deps), so only for this import it is replaced by a
    module whose mapping says no model renames '.' to '_' (the only thing the checker asks it)."""
    name = "bfcl_eval.constants.model_config"
    fake = types.ModuleType(name)
    fake.MODEL_CONFIG_MAPPING = bfcl._NoRenames()
    saved = sys.modules.get(name)
    sys.modules[name] = fake
    try:
        checker = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
        utils = importlib.import_module("bfcl_eval.utils")
        enums = importlib.import_module("bfcl_eval.constants.enums")
        yield checker, utils, enums
    finally:
        sys.modules.pop("bfcl_eval.eval_checker.ast_eval.ast_checker", None)
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def reference_verdict(own, item: dict, calls: list[tuple[str, str]] | None) -> bool:
    """What bfcl-eval's eval runner (``_evaluate_single_ast_entry`` / ``_evaluate_single_relevance_entry``) decides
    for an OpenAI FC model (``OpenAICompletionsHandler``): the result is ``[{name: arguments}]`` when the model
    called tools, else its text; ``decode_ast`` is ``[{name: json.loads(arguments)}]``."""
    checker, utils, enums = own
    result = [{n: a} for n, a in calls] if calls else "I cannot help with that."

    def decode_ast(res):
        out = []
        for invoked in res:
            name = list(invoked.keys())[0]
            out.append({name: json.loads(invoked[name])})
        return out

    category = item["category"]
    if "relevance" in category:
        try:
            decoded = decode_ast(result)
            called = not utils.is_empty_output(decoded)
        except Exception:  # noqa: BLE001 - bfcl's runner: a decode failure means no call
            called = False
        return not called if "irrelevance" in category else called
    try:
        decoded = decode_ast(result)
    except Exception:  # noqa: BLE001
        return False
    if not utils.is_function_calling_format_output(decoded):
        return False
    return bool(checker.ast_checker(item["function"], decoded, item["ground_truth"], enums.Language.PYTHON, category,
                                    bfcl.CHECKER_NAME)["valid"])


def _pick(values: list):
    return next((v for v in values if v != ""), "")


def _value(v):
    """A ground-truth value (possible answers per key, nested for dicts) made concrete."""
    if isinstance(v, dict):
        return {k: _value(_pick(vs)) for k, vs in v.items() if _pick(vs) != ""}
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def correct_calls(item: dict) -> list[tuple[str, str]]:
    calls = []
    for call in item["ground_truth"]:
        (name, params), = call.items()
        args = {k: _value(_pick(vs)) for k, vs in params.items() if _pick(vs) != ""}
        calls.append((name, json.dumps(args)))
    return calls


def _wrong(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1000
    if isinstance(v, str):
        return v + " zzz"
    return "zzz"


def answer_variants(item: dict) -> dict[str, list[tuple[str, str]] | None]:
    if bfcl.is_relevance(item["category"]):
        first = item["function"][0]
        return {"no call": None, "a call": [(first["name"], "{}")], "bad json": [(first["name"], "{oops")]}
    good = correct_calls(item)
    name, args = good[0]
    parsed = json.loads(args)
    wrong_arg = dict(parsed)
    if parsed:
        key = next(iter(parsed))
        wrong_arg[key] = _wrong(parsed[key])
    return {"correct": good, "wrong arg": [(name, json.dumps(wrong_arg))] + good[1:],
            "wrong function": [("no_such_function", args)] + good[1:], "extra call": good + [good[0]],
            "no call": None, "bad json": [(name, args[:-1])] + good[1:]}


@pytest.mark.parametrize("category", AST_CATEGORIES + REL_CATEGORIES)
def test_scores_equal_bfcl_checker(bfcl_own, category):
    items = bfcl.load_category(category, limit=3)
    assert len(items) == 3
    seen = set()
    for item in items:
        for label, calls in answer_variants(item).items():
            ours = bfcl.score_item(item, calls)["valid"]
            assert ours == reference_verdict(bfcl_own, item, calls), (item["id"], label, calls)
            seen.add((label, ours))
    if category in AST_CATEGORIES:  # the hand-made answers exercise both verdicts
        assert ("correct", True) in seen and ("wrong function", False) in seen and ("no call", False) in seen
    else:
        assert {v for _, v in seen} == {True, False}


def test_tools_are_json_schema():
    items = [it for c in bfcl.CATEGORIES for it in bfcl.load_category(c, limit=20)]
    from lmforge.serve.tools import parse_tools

    for it in items:
        tools = [bfcl.to_openai_tool(f) for f in it["function"]]
        parse_tools(tools)  # valid, enforceable JSON Schema (raises otherwise)
        for t in tools:
            assert _types(t["function"]["parameters"]) <= {"object", "array", "string", "integer", "number",
                                                          "boolean"}, t


def _types(node) -> set:
    if isinstance(node, dict):
        return ({node["type"]} if isinstance(node.get("type"), str) else set()).union(
            *(_types(v) for k, v in node.items() if k not in ("enum", "default", "type")))
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node))
    return set()


def test_wilson_ci():
    assert bfcl.wilson_ci(0, 3)[0] == 0.0 and 0.5 < bfcl.wilson_ci(0, 3)[1] < 0.6  # 0/3 is not "surely 0"
    lo, hi = bfcl.wilson_ci(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3  # the textbook value


def test_bad_config(tmp_path):
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one"):
        bfcl.run(bfcl.Config(), tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown BFCL category 'nope'"):
        bfcl.run(bfcl.Config(base_url="http://127.0.0.1:1/v1", categories=["nope"]), tmp_path / "y")
    with pytest.raises(ConfigError, match="base_url: cannot reach http://127.0.0.1:1/v1"):  # not 0/N scored
        bfcl.run(bfcl.Config(base_url="http://127.0.0.1:1/v1", categories=["simple_python"], limit=1), tmp_path / "z")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bfcl") / "tiny-bfcl"
    _build_serve_model(folder, ctx=2048)
    return folder


def _check_run(out, n_categories: int, limit: int, underscore_dots: bool = False) -> None:
    """Every call the model made parses and validates against its tool (but a last one cut off by max_tokens), and
    the recorded verdicts are the scorer's."""
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == limit * n_categories
    assert set(results["categories"]) == set(bfcl.CATEGORIES[:n_categories]) | {"overall"}
    assert results["categories"]["overall"]["n"] == len(records)
    items = {it["id"]: it for c in bfcl.CATEGORIES[:n_categories] for it in bfcl.load_category(c, limit)}
    n_calls = 0
    for r in records:
        assert r["error_type"] != "request_error", r
        if r["error_type"] == "prompt_too_long":  # the tiny BPE makes long prompts: recorded, scored wrong
            assert not r["valid"]
            continue
        functions = items[r["id"]]["function"]
        tools = {bfcl.tool_name(f["name"], underscore_dots): bfcl.to_openai_tool(f)["function"]["parameters"]
                 for f in functions}
        names = {bfcl.tool_name(f["name"], underscore_dots): f["name"] for f in functions}
        for i, (name, args) in enumerate(r["calls"] or []):
            if r["finish_reason"] == "length" and i == len(r["calls"]) - 1:
                continue  # cut off by max_tokens
            jsonschema.validate(json.loads(args), tools[name])
            n_calls += 1
        assert r["valid"] == bfcl.score_item(items[r["id"]], r["calls"], names)["valid"]
    assert n_calls > 0
    assert results["unparsed_answers"] == sum(1 for r in records if r["calls"] and r["decoded"] is None)


def test_in_process_constrained(tiny_model, tmp_path):
    from lmforge.cli import app

    out = tmp_path / "run"
    # tool_choice required at temperature 1 (seeded): a random model then makes calls, most of them complete
    res = CliRunner().invoke(app, ["eval-bfcl", "--model", str(tiny_model), "--limit", "1", "--max-tokens", "160",
                                   "--tool-choice", "required", "--temperature", "1", "--max-model-len", "2048",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    _check_run(out, len(bfcl.CATEGORIES), 1)
    assert json.loads((out / "manifest.json").read_text())["stage"] == bfcl.STAGE


def test_in_process_unconstrained(tiny_model, tmp_path):
    """Without the grammar the model writes what it likes; whatever it writes is recorded and scored."""
    cats = ["simple_python", "irrelevance"]
    bfcl.run(bfcl.Config(model=str(tiny_model), categories=cats, limit=1, max_tokens=24, constrained=False,
                         max_model_len=2048), tmp_path / "u")
    records = [json.loads(line) for line in (tmp_path / "u" / "items.jsonl").read_text().splitlines()]
    assert [r["category"] for r in records] == cats
    items = {it["id"]: it for c in cats for it in bfcl.load_category(c, 1)}
    for r in records:
        assert r["error_type"] != "request_error" and r["text"] and r["finish_reason"] in ("stop", "length")
        assert r["valid"] == bfcl.score_item(items[r["id"]], r["calls"])["valid"]
    assert json.loads((tmp_path / "u" / "results.json").read_text())["constrained"] is False


def test_through_server(tiny_model, tmp_path):
    from lmforge.serve.engine import Engine
    from lmforge.serve.smoke import running_server

    engine = Engine.from_folder(tiny_model, max_num_seqs=2, max_model_len=2048)
    try:
        with running_server(engine, "tiny-bfcl") as url:
            cats = list(bfcl.CATEGORIES[:4])
            bfcl.run(bfcl.Config(base_url=url, categories=cats, limit=2, max_tokens=160, tool_choice="required",
                                 temperature=1.0, underscore_dots=True, parallel_tool_calls="per_category"),
                     tmp_path / "srv")
    finally:
        engine.shutdown()
    _check_run(tmp_path / "srv", 4, 2, underscore_dots=True)
    records = [json.loads(line) for line in (tmp_path / "srv" / "items.jsonl").read_text().splitlines()]
    # parallel_tool_calls per category: exactly one call outside the parallel categories
    assert all(len(r["calls"]) == 1 for r in records if "parallel" not in r["category"])


def test_concurrent_questions_keep_their_order(tiny_model, tmp_path):
    """--concurrency 3: questions answered side by side (one engine batch), items.jsonl still in question order, every
    call valid and every verdict the scorer's."""
    from lmforge.cli import app

    out = tmp_path / "c"
    res = CliRunner().invoke(app, ["eval-bfcl", "--model", str(tiny_model), "--categories", *bfcl.CATEGORIES[:2],
                                   "--limit", "2", "--max-tokens", "160", "--tool-choice", "required",
                                   "--temperature", "1", "--max-model-len", "2048", "--concurrency", "3",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [it["id"] for c in bfcl.CATEGORIES[:2] for it in bfcl.load_category(c, 2)]
    _check_run(out, 2, 2)
