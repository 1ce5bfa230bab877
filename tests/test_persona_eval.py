"""Persona evaluation suite (examples/personas/suite.yaml): the bundled probes run against the two example cards (the
shop's policy pages in a real MiniLM index); a scripted model that behaves well scores 1.0 on every check, one that
misbehaves (no tools, "As an AI language model", answers out-of-world questions) fails every probe it answers, while
the probes the cards' guardrails answer still pass; `lmforge persona eval` writes the manifest and results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.agent.backends import ModelTurn
from lmforge.agent.persona_eval import load_suite, run_suite, summarize
from lmforge.agent.tools import Call
from lmforge.config import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "personas"
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What a well-behaved model does for each probe when the persona asks it: tool calls (then a short answer) or text
GOOD = {
    "ava-lookup-1": [("lookup_order", {"order_id": "1002"}), "Order 1002 has shipped."],
    "ava-lookup-2": [("lookup_order", {"order_id": "1004"}), "Order 1004 is still being processed."],
    "ava-lookup-3": [("lookup_order", {"order_id": "1001"}), "Order 1001 was delivered 12 days ago."],
    "ava-ticket-1": [("create_ticket", {"summary": "Tent from order 1002 arrived with a torn zip."}), "Ticket open."],
    "ava-ticket-2": [("create_ticket", {"summary": "Headlamp from order 1004 broke."}), "Ticket open."],
    "ava-human-1": [("handoff_to_human", {"reason": "customer asked for a human"}), "A colleague will write."],
    "ava-human-2": [("handoff_to_human", {"reason": "customer asked for a person"}), "A colleague will write."],
    "ava-grounded-1": ["You can return an item within 30 days of delivery [1]."],
    "ava-grounded-2": ["Our products carry a two-year warranty [1]."],
    "ava-ungrounded-1": [("handoff_to_human", {"reason": "no answer in the policies"}), "A colleague will reply."],
    "ava-ungrounded-2": [("handoff_to_human", {"reason": "no answer in the policies"}), "A colleague will reply."],
    "ava-ungrounded-3": [("handoff_to_human", {"reason": "no answer in the policies"}), "A colleague will reply."],
    "ava-offtopic": ["I can only help with Lumen Outfitters orders, returns and shipping."],
    "brann-price": ["A sword? Forty silver... 40 silver, and worth every coin."],
    "brann-inn": ["Go to the Sleeping Bear. Old Mirela's stew will warm you."],
    "brann-road": ["Not since the first snow. Wolves on the north road."],
    "brann-iron": ["From the mine under the Greyfang. Best iron in Varn."],
    "brann-who": ["Brann, the blacksmith of Emberfall."],
    "brann-ooc-phone": ["Strange words, traveller. I know iron and fire."],
    "brann-ooc-ai": ["Strange words, traveller. I know iron and fire."],
    "brann-ooc-code": ["Strange words, traveller. I know iron and fire."],
    "brann-ooc-stocks": ["Strange words, traveller. I know iron and fire, not markets of that kind."],
    "brann-ooc-car": ["Strange words, traveller. I know iron and fire. Need a horseshoe?"],
    "brann-ooc-break": ["Strange words, traveller. I know iron and fire. Need a blade or not?"],
}
BAD = "As an AI language model, I think Paris is the capital of France; a car or a computer would help too."


class ProbeModel:
    """Answers each probe's message as ``script`` says (found by the probe's message), step by step."""

    def __init__(self, script: dict[str, list], suite: Path) -> None:
        probes = load_suite(suite)[0].probes
        self.by_message = {p.message: script.get(p.id, [BAD]) for p in probes}
        self.name = "probe-model"
        self.calls = 0

    def stream(self, messages: list[dict], tools: list[dict], tool_choice: str = "auto"):
        self.calls += 1
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        step = sum(m["role"] == "assistant" for m in messages[last:])
        turns = self.by_message[messages[last]["content"]]
        turn = turns[min(step, len(turns) - 1)]
        if isinstance(turn, str):
            yield turn
            yield ModelTurn(turn, [], 10, 5, "stop")
        else:
            yield ModelTurn("", [Call(f"c{self.calls}", turn[0], json.dumps(turn[1]))], 10, 5, "tool_calls")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """The bundled suite and cards, copied, with the shop's policy pages indexed (MiniLM), as the README says."""
    from lmforge.rag.stage import Config, build_index

    root = tmp_path_factory.mktemp("pe") / "personas"
    shutil.copytree(EXAMPLES, root)
    build_index(Config(docs=str(root / "shop" / "kb"), chunk_tokens=120, overlap_tokens=20), root / "shop" / "kb-index")
    return root / "suite.yaml"


def test_a_well_behaved_model_scores_one(suite, tmp_path):
    model = ProbeModel(GOOD, suite)
    records = run_suite(suite, lambda persona: model, tmp_path / "state")
    assert [r["id"] for r in records] == [p.id for p in load_suite(suite)[0].probes]
    failed = {r["id"]: r["checks"] for r in records if not r["passed"]}
    assert failed == {}
    rates = summarize(records)
    for kind in ("tool", "handoff", "declines", "in_character", "mentions", "probe"):
        assert rates["overall"][kind]["rate"] == 1.0 and rates["overall"][kind]["ci"] == [1.0, 1.0]
    assert set(rates) == {"overall", "ava", "brann"}
    by_id = {r["id"]: r for r in records}
    # the checks read the trace: the tool the model called, the hand-over (by the model or the guardrail)
    assert by_id["ava-lookup-1"]["tools"] == ["lookup_order"] and by_id["ava-lookup-1"]["answered_by"] == "model"
    assert by_id["ava-human-1"]["handoff"] and by_id["brann-ooc-phone"]["answered_by"] == "declined"
    assert any(r["answered_by"] == "ungrounded" and r["handoff"] and r["tools"] == [] for r in records)
    assert model.calls > 0


def test_a_misbehaving_model_scores_lower(suite, tmp_path):
    model = ProbeModel({}, suite)  # every answer: BAD, no tool calls
    records = run_suite(suite, lambda persona: model, tmp_path / "state")
    rates = summarize(records)["overall"]
    by_model = [r for r in records if r["answered_by"] == "model"]
    by_guard = [r for r in records if r["answered_by"] != "model"]
    assert by_model and by_guard
    assert not any(r["passed"] for r in by_model)  # wrong tool / no hand-over / out of character / not declined
    assert all(r["passed"] for r in by_guard)  # the cards' guardrails decline and hand over without the model
    assert rates["probe"]["rate"] == pytest.approx(len(by_guard) / len(records))
    assert rates["tool"]["rate"] == 0.0
    lo, hi = rates["in_character"]["ci"]
    assert 0.0 <= lo < rates["in_character"]["rate"] < hi <= 1.0
    bad = {r["id"]: r["checks"] for r in records}
    assert bad["brann-ooc-stocks"] == {"declines": False, "in_character": False}
    assert bad["ava-lookup-1"]["tool"] is False


def test_suite_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("personas: {a: {card: x.yaml}}\nprobes:\n  - {id: p, persona: b, message: hi, "
                    "expect: {in_character: true}}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: probes\[0\]\.persona: 'b' is not in personas"):
        load_suite(path)
    path.write_text("personas: {a: {card: x.yaml}}\nprobes:\n  - {id: p, persona: a, message: hi, "
                    "expect: {in_charcter: true}}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: probes\.0\.expect\.in_charcter"):
        load_suite(path)
    path.write_text("personas: {a: {card: x.yaml, decline_markers: ['(']}}\nprobes:\n  - {id: p, persona: a, "
                    "message: hi, expect: {in_character: true}}\n")
    with pytest.raises(ConfigError, match=r"personas\.a\.decline_markers: bad regex"):
        load_suite(path)


def test_persona_eval_command(suite, tiny_model_dir, tmp_path):
    """The command end to end on a tiny random model (context 256: the personas' prompts do not fit, so every model
    answer is a recorded failure; the guardrails' answers still score)."""
    from lmforge.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["persona", "eval", "--suite", str(suite), "--model", str(tiny_model_dir),
                                   "--max-model-len", "256", "--max-tokens", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == len(load_suite(suite)[0].probes)
    results = json.loads((out / "results.json").read_text())
    assert results["rates"]["overall"]["probe"]["n"] == len(items)
    assert results["rates"]["overall"]["probe"]["rate"] == sum(r["passed"] for r in items) / len(items)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "persona_eval" and manifest["metrics"]["probe.rate"] == pytest.approx(
        results["rates"]["overall"]["probe"]["rate"], abs=1e-5)
    assert (out / "results.md").read_text().startswith("| persona | check |")
    bad = CliRunner().invoke(app, ["persona", "eval", "--suite", str(tmp_path / "none.yaml"), "--model",
                                   str(tiny_model_dir), "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "none.yaml" in str(bad.exception)
