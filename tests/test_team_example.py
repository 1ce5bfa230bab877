"""The bundled team example (examples/teams/kb_answer.yaml: analyst → writer → reviewer) end to end through
`lmforge team`: over an OpenAI endpoint whose model follows the SOPs (the analyst's search runs on a real MiniLM index
of the shop's policy pages; the run ends when the reviewer approves, with the cited answer last), and in-process on a
tiny random model (grammar-constrained messages: every posted message matches its role's schema)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from agent_fakes import fake_openai_server
from typer.testing import CliRunner

from lmforge.agent.team import expand_quotes, load_team, passages, sentences
from lmforge.cli import app

REPO = Path(__file__).resolve().parents[1]
TEAM = REPO / "examples" / "teams" / "kb_answer.yaml"
QUESTION = "How many days do I have to return an item?"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> Path:
    from lmforge.rag.stage import Config, build_index

    out = tmp_path_factory.mktemp("teamkb") / "kb-index"
    build_index(Config(docs=str(REPO / "examples" / "personas" / "shop" / "kb"), chunk_tokens=120,
                       overlap_tokens=20), out)
    return out


def test_bundled_team_answers_with_citations_over_an_endpoint(kb, tmp_path):
    fact = {"source": 1, "quote": "You can return any delivered item within 30 days of delivery for a full refund."}
    script = [[("post_message", {"facts": [fact]})],
              [("post_message", {"answer": "You have 30 days from delivery to return an item. [1]"})],
              [("post_message", {"verdict": "approve", "comments": "Supported by fact 1 and cited."})]]
    out = tmp_path / "run"
    with fake_openai_server(script) as (base_url, requests):
        res = CliRunner().invoke(app, ["team", str(TEAM), QUESTION, "--base-url", base_url, "--index", str(kb),
                                       "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    [search] = [r for r in trace if r["type"] == "tool" and r["name"] == "search_knowledge_base"]
    assert search["error"] is None and "30" in search["result"] and "returns.md" in search["result"]
    # the team ran the search itself (an SOP step) with the question as the query; the analyst's model read the
    # numbered passages as a tool result and was offered only post_message
    assert search["sop"] and search["role"] == "analyst" and json.loads(search["arguments"]) == {"query": QUESTION}
    analyst = requests[0]["messages"]
    assert analyst[-2]["tool_calls"][0]["function"]["name"] == "search_knowledge_base"
    assert analyst[-1]["role"] == "tool" and json.loads(analyst[-1]["content"])[0]["source"] == 1
    assert "returns.md" in analyst[-1]["content"]
    assert [t["function"]["name"] for t in requests[0]["tools"]] == ["post_message"]
    # the writer sees the analyst's facts, the reviewer the writer's answer: one shared log
    assert "30 days of delivery" in requests[1]["messages"][-1]["content"]
    # the analyst could only quote the passages: its message schema is their sentences, each with its number
    post = requests[0]["tools"][0]["function"]["parameters"]["properties"]["facts"]["items"]
    returns = [o for o in post["anyOf"] if fact["quote"] in o["properties"]["quote"]["enum"]]
    assert len(returns) == 1 and returns[0]["properties"]["source"] == {"const": 1}
    assert "[1]" in requests[2]["messages"][-1]["content"]
    log = json.loads((out / "log.json").read_text())
    assert [m["role"] for m in log] == ["analyst", "writer", "reviewer"]
    assert json.loads((out / "manifest.json").read_text())["metrics"]["stop_reason"] == "stop_condition"


def test_bundled_team_runs_in_process_on_a_tiny_model(kb, tmp_path):
    from test_serve import _build_serve_model

    pytest.importorskip("xgrammar")
    model = tmp_path / "tiny"
    _build_serve_model(model, 4096)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["team", str(TEAM), QUESTION, "--model", str(model), "--index", str(kb),
                                   "--max-tokens", "96", "--max-model-len", "4096", "--out", str(out)])
    assert res.exit_code in (0, 1), res.output  # 1: a role posted nothing valid (said, recorded)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["stop_reason"] in ("stop_condition", "max_rounds", "role_failed")
    assert manifest["metrics"]["model_calls"] >= 1
    schemas = {r.name: r.message for r in load_team(TEAM).roles}
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    found = {"search_knowledge_base": [p for r in trace if r["type"] == "tool" and r.get("sop")
                                       for p in passages(r["result"])]}
    assert found["search_knowledge_base"]
    for m in json.loads((out / "log.json").read_text()):
        # constrained decoding: always the role's schema, the analyst's quotes verbatim from its search's passages
        jsonschema.validate(m["content"], expand_quotes(schemas[m["role"]], found))
        for f in m["content"].get("facts", []):
            assert any(n == f["source"] and f["quote"] in sentences(text) for n, text in found["search_knowledge_base"])
