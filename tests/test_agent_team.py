"""Role-playing teams: roles with SOPs and tools post schema-checked messages on a shared log until the stop condition
(or max_rounds, or a role that posts nothing); traced per role and round; `lmforge team` through the official openai
client against a scripted OpenAI-compatible server, and `lmforge agent trace` printing the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_fakes import fake_openai_server
from typer.testing import CliRunner

from lmforge.agent import ScriptedModel
from lmforge.agent.team import Team, TeamSpec, load_team
from lmforge.cli import app
from lmforge.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

CODE_TEAM = """
name: code-review
roles:
  - name: planner
    goal: break the task into steps
    sop: [List the steps.]
    message: {type: object, properties: {steps: {type: array, items: {type: string}}}, required: [steps]}
  - name: coder
    goal: write the code
    sop: [Follow the plan, fix what the reviewer asked for.]
    tools: [calculator]
    message: {type: object, properties: {code: {type: string}}, required: [code]}
  - name: reviewer
    goal: review the code
    message:
      type: object
      properties: {verdict: {type: string, enum: [approve, revise]}, comments: {type: string}}
      required: [verdict, comments]
repeat_from: coder
stop: {role: reviewer, field: verdict, equals: approve}
max_rounds: 3
"""


def spec(tmp_path: Path, text: str = CODE_TEAM) -> TeamSpec:
    path = tmp_path / "team.yaml"
    path.write_text(text)
    return load_team(path)


def test_team_revises_until_the_reviewer_approves(tmp_path):
    from lmforge.agent import calculator

    model = ScriptedModel([
        [("post_message", {"steps": ["compute the area", "write area()"]})],
        [("calculator", {"expression": "3.5 * 2"})],
        [("post_message", {"code": "def area(w, h): return w + h"})],
        [("post_message", {"verdict": "revise", "comments": "area multiplies"})],
        [("post_message", {"code": 12})],  # fails the schema: the coder must post again
        [("post_message", {"code": "def area(w, h): return w * h"})],
        [("post_message", {"verdict": "approve", "comments": "ok"})],
    ])
    team = Team(spec(tmp_path), model, {"calculator": calculator}, out_dir=tmp_path / "run")
    result = team.run("Write area(w, h) for a rectangle.")
    assert result.stop_reason == "stop_condition" and result.rounds == 2
    assert [(m["round"], m["role"]) for m in result.log] == [(1, "planner"), (1, "coder"), (1, "reviewer"),
                                                              (2, "coder"), (2, "reviewer")]
    assert result.final == {"verdict": "approve", "comments": "ok"}
    assert result.log[3]["content"] == {"code": "def area(w, h): return w * h"}
    # each role saw its own system prompt (goal, SOP, task) and the shared log so far
    coder_system, coder_user = model.requests[4][0]["content"], model.requests[4][1]["content"]
    assert coder_system.startswith("You are the coder of a team (code-review; the others: planner, reviewer)")
    assert "1. Follow the plan" in coder_system and "Write area(w, h)" in coder_system
    assert '[round 1] reviewer: {"verdict": "revise", "comments": "area multiplies"}' in coder_user
    assert all(c == "required" for c in model.choices)
    tools = [r for r in result.trace if r["type"] == "tool"]
    assert tools[1] == {**tools[1], "role": "coder", "round": 1, "name": "calculator", "result": "7"}
    assert "field 'code'" in tools[4]["error"]
    lines = (tmp_path / "run" / "trace.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines][-1] == "stop"
    printed = CliRunner().invoke(app, ["agent", "trace", str(tmp_path / "run")])
    assert printed.exit_code == 0
    assert "round 2  coder" in printed.stdout and "message from reviewer" in printed.stdout
    assert "stopped (stop_condition)" in printed.stdout


def test_team_stops_at_max_rounds_and_when_a_role_posts_nothing(tmp_path):
    from lmforge.agent import calculator

    text = CODE_TEAM.replace("max_rounds: 3", "max_rounds: 1")
    model = ScriptedModel([[("post_message", {"steps": []})], [("post_message", {"code": "x"})],
                           [("post_message", {"verdict": "revise", "comments": "no"})]])
    result = Team(spec(tmp_path, text), model, {"calculator": calculator}).run("t")
    assert result.stop_reason == "max_rounds" and len(result.log) == 3
    # several post_message calls in one model turn (parallel calls): the first valid one is the role's message
    chatty = ScriptedModel([[("post_message", {"steps": 1}), ("post_message", {"steps": ["a"]}),
                             ("post_message", {"steps": ["b"]})],
                            [("post_message", {"code": "x"})],
                            [("post_message", {"verdict": "revise", "comments": "no"})]])
    result = Team(spec(tmp_path, text), chatty, {"calculator": calculator}).run("t")
    assert [m["content"] for m in result.log][0] == {"steps": ["a"]}
    silent = ScriptedModel([[("post_message", {"steps": ["a"]})], "I will just chat instead."] + ["chat"] * 5)
    result = Team(spec(tmp_path), silent, {"calculator": calculator}).run("t")
    assert result.stop_reason == "role_failed" and "role 'coder' posted no valid message" in result.error


CALL_TEAM = """
name: calc
roles:
  - name: solver
    sop:
      - {call: calculator, arguments: {expression: "{task}"}}
      - Post the value the calculator returned.
    message: {type: object, properties: {value: {type: number}}, required: [value]}
max_rounds: 1
"""


def test_sop_call_steps_run_with_the_task_and_reach_the_model_as_data(tmp_path):
    from lmforge.agent import calculator

    s = spec(tmp_path, CALL_TEAM)
    assert s.tool_names() == ["calculator"]
    model = ScriptedModel([[("post_message", {"value": 42})]])
    result = Team(s, model, {"calculator": calculator}).run("6 * 7")
    assert result.stop_reason == "max_rounds" and result.final == {"value": 42}
    # the team made the call itself, with the task as the argument; the model saw it as a call and its result
    [request] = model.requests
    system, user, call, answer = request
    assert "1. The team called calculator(expression=\"6 * 7\") for you" in system["content"]
    assert "2. Post the value" in system["content"]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"] == {
        "name": "calculator", "arguments": '{"expression": "6 * 7"}'}
    assert answer == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "42"}
    assert [t["function"]["name"] for t in model.tools_seen[0]] == ["post_message"]  # not offered to the model
    [step, post] = [r for r in result.trace if r["type"] == "tool"]
    assert step == {**step, "role": "solver", "round": 1, "sop": True, "name": "calculator", "result": "42",
                    "error": None}
    assert post["name"] == "post_message" and "sop" not in post
    # a failing step is the model's to read, like any tool error (here: the task is not arithmetic)
    model = ScriptedModel([[("post_message", {"value": 0})]])
    result = Team(s, model, {"calculator": calculator}).run("What is the answer?")
    assert "not an arithmetic expression" in model.requests[0][-1]["content"] and result.final == {"value": 0}


QUOTE_TEAM = """
name: quotes
roles:
  - name: analyst
    sop:
      - {call: search, arguments: {query: "{task}"}}
      - Quote the passages.
    message:
      type: object
      properties: {facts: {type: array, minItems: 1, maxItems: 2, items: {x-quote: search}}}
      required: [facts]
max_rounds: 1
"""
PASSAGES = [{"source": 1, "text": "## Returns\nYou can return an item within 30 days\nof delivery. Refunds take 5 days."},
            {"source": 2, "text": "- Gift cards cannot be returned.\n- 礼品卡不退。"}]


def search(query: str) -> list:
    """Search the passages."""
    return PASSAGES


def test_quoted_facts_are_sentences_of_the_sop_results_with_their_passage_numbers(tmp_path):
    s = spec(tmp_path, QUOTE_TEAM)
    made_up = {"quote": "Items can be returned within 30 days.", "source": 1}
    wrong_source = {"quote": "Refunds take 5 days.", "source": 2}
    right = [{"quote": "You can return an item within 30 days of delivery.", "source": 1},
             {"quote": "礼品卡不退。", "source": 2}]
    model = ScriptedModel([[("post_message", {"facts": [made_up]})], [("post_message", {"facts": [wrong_source]})],
                           [("post_message", {"facts": right})]])
    result = Team(s, model, {"search": search}).run("How long do I have to return an item?")
    assert result.stop_reason == "max_rounds" and result.final == {"facts": right}
    # the model was offered one sentence per enum entry (paragraphs joined, the heading left out), numbered
    items = model.tools_seen[0][0]["function"]["parameters"]["properties"]["facts"]["items"]
    assert [(o["properties"]["source"], o["properties"]["quote"]["enum"]) for o in items["anyOf"]] == [
        ({"const": 1}, ["You can return an item within 30 days of delivery.", "Refunds take 5 days."]),
        ({"const": 2}, ["Gift cards cannot be returned.", "礼品卡不退。"])]
    # a paraphrase, or a sentence cited to the wrong passage, went back to the model as an error
    errors = [r for r in result.trace if r["type"] == "tool" and r["name"] == "post_message" and r["error"]]
    assert len(errors) == 2 and all("facts.0" in e["error"] for e in errors)


def test_quotes_with_nothing_found_and_bad_quote_specs(tmp_path):
    def nothing(query: str) -> list:
        """Find nothing."""
        return []

    s = spec(tmp_path, QUOTE_TEAM)
    model = ScriptedModel([[("post_message", {"facts": [{"quote": "(the search found no passage)", "source": 0}]})]])
    result = Team(s, model, {"search": nothing}).run("q")
    assert result.final == {"facts": [{"quote": "(the search found no passage)", "source": 0}]}
    with pytest.raises(ValueError, match="role 'analyst': message schema: x-quote: 'calculator' is not a tool one of "
                                         "this role's SOP call steps runs"):
        Team(spec(tmp_path, QUOTE_TEAM.replace("items: {x-quote: search}", "items: {x-quote: calculator}")),
             ScriptedModel([]), {"search": search})


def test_bad_team_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"team\.yaml: roles\.0\.sops: unknown key"):
        spec(tmp_path, "name: t\nroles:\n  - name: a\n    sops: [x]\n")
    with pytest.raises(ValueError, match="role 'a': unknown tool"):
        Team(spec(tmp_path, "name: t\nroles:\n  - name: a\n    tools: [shell]\n"), ScriptedModel([]))
    with pytest.raises(ConfigError, match=r"roles\.0\.sop\.0\.call\.tool: unknown key"):
        spec(tmp_path, "name: t\nroles:\n  - name: a\n    sop: [{tool: calculator}]\n")
    with pytest.raises(ConfigError, match=r"roles\.0\.sop\.1: an SOP step is a string .* or \{call: TOOL"):
        spec(tmp_path, "name: t\nroles:\n  - name: a\n    sop: [ok, 3]\n")
    with pytest.raises(ValueError, match="role 'a': sop step 1: unknown tool 'shell'"):
        Team(spec(tmp_path, "name: t\nroles:\n  - name: a\n    sop: [{call: shell}]\n"), ScriptedModel([]))
    with pytest.raises(ValueError, match="role 'a': sop step 2: invalid arguments for tool 'calculator': field "
                                         "'expression': Field required"):
        from lmforge.agent import calculator

        Team(spec(tmp_path, "name: t\nroles:\n  - name: a\n    sop: [x, {call: calculator, arguments: {expr: 1}}]\n"),
             ScriptedModel([]), {"calculator": calculator})
    with pytest.raises(ValueError, match="stop.role: no role 'b'"):
        Team(spec(tmp_path, "name: t\nroles: [{name: a}]\nstop: {role: b, field: x, equals: 1}\n"), ScriptedModel([]))
    res = CliRunner().invoke(app, ["team", str(tmp_path / "missing.yaml"), "task", "--base-url", "http://x/v1"])
    assert res.exit_code == 2 and "missing.yaml: file not found" in res.stderr


def test_team_cli_over_an_openai_endpoint(tmp_path):
    (tmp_path / "team.yaml").write_text(CODE_TEAM)
    script = [[("post_message", {"steps": ["one"]})], [("post_message", {"code": "print(1)"})],
              [("post_message", {"verdict": "approve", "comments": "fine"})]]
    with fake_openai_server(script) as (base_url, requests):
        res = CliRunner().invoke(app, ["team", str(tmp_path / "team.yaml"), "Print 1.", "--base-url", base_url,
                                       "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines()[-1] == '[round 1] reviewer: {"verdict": "approve", "comments": "fine"}'
    assert requests[0]["tool_choice"] == "required"
    assert [t["function"]["name"] for t in requests[1]["tools"]] == ["calculator", "post_message"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["metrics"]["stop_reason"] == "stop_condition" and manifest["metrics"]["messages"] == 3
    assert json.loads((tmp_path / "run" / "log.json").read_text())[1]["content"] == {"code": "print(1)"}


def test_bundled_kb_team_file_loads():
    s = load_team(REPO / "examples" / "teams" / "kb_answer.yaml")
    assert [r.name for r in s.roles] == ["analyst", "writer", "reviewer"] and s.repeat_from == "writer"
    def search_knowledge_base(query: str) -> list:
        """Stand-in for the index search."""
        return []

    Team(s, ScriptedModel([]), {"search_knowledge_base": search_knowledge_base})  # schemas enforceable, names match
