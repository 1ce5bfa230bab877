"""Personas: YAML cards checked with clear errors, served as `persona:<name>` through a real server and the official
openai client — the customer-service example (policy pages in a real MiniLM index, SQLite orders, a refund that needs
the customer's "yes" in a later message, hand-over when the pages have no answer, declines) and the NPC example
(in-character declines, per-player memory across conversations) — with a scripted model where a real one cannot be
relied on, and SmolLM2-135M-Instruct answering in character from its world facts."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from openai import OpenAI

from lmforge.agent import ScriptedModel
from lmforge.agent.persona import PersonaSet, load_persona
from lmforge.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "personas"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cards(tmp_path_factory) -> Path:
    """The two example cards, copied, with the shop's policy pages indexed by `lmforge rag index` (MiniLM)."""
    from lmforge.rag.stage import Config, build_index

    root = tmp_path_factory.mktemp("personas")
    shutil.copytree(EXAMPLES, root / "personas")
    shop = root / "personas" / "shop"
    build_index(Config(docs=str(shop / "kb"), chunk_tokens=120, overlap_tokens=20), shop / "kb-index")
    return root / "personas"


def write_card(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "card.yaml"
    path.write_text(text)
    return path


def test_card_errors_name_the_file_and_key(tmp_path, cards):
    with pytest.raises(ConfigError, match=r"card\.yaml: guardrails\.decline_mesage: unknown key"):
        load_persona(write_card(tmp_path, "name: x\nguardrails:\n  decline_mesage: no\n"), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"card\.yaml: knowledge_base: no knowledge base at .*missing-index"):
        load_persona(write_card(tmp_path, "name: x\nknowledge_base: missing-index\n"), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"card\.yaml: tools\[1\]: unknown tool 'teleport'"):
        load_persona(write_card(tmp_path, "name: x\ntools: [calculator, teleport]\n"), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"tools_module: no file"):
        load_persona(write_card(tmp_path, "name: x\ntools_module: nope.py\n"), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"card\.yaml: name: 'a b'"):
        load_persona(write_card(tmp_path, "name: a b\n"), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"card\.yaml:\d+: invalid YAML"):
        load_persona(write_card(tmp_path, "name: x\nstyle: [unclosed\n"), tmp_path / "s")
    with pytest.raises(ConfigError, match="'handoff' needs a knowledge_base"):
        load_persona(write_card(tmp_path, "name: x\nguardrails: {ungrounded: handoff}\n"), tmp_path / "s")
    ok = load_persona(cards / "shop" / "ava.yaml", tmp_path / "state")
    assert [t.name for t in ok.tools_for(ok_ctx(ok))] == ["lookup_order", "refund_order", "confirm_refund",
                                                         "create_ticket", "handoff_to_human"]


def ok_ctx(persona):
    from lmforge.agent.persona import PersonaContext

    return PersonaContext(persona.name, persona.state_dir)


@pytest.fixture(scope="module")
def served(cards, tiny_model_dir, tmp_path_factory):
    """A real server (create_app on a tiny engine) with both personas, answering with whatever ScriptedModel the
    test puts in ``holder["model"]``; yields (openai client, holder, state folder)."""
    from lmforge.agent.persona_http import attach_personas
    from lmforge.serve.api import create_app
    from lmforge.serve.engine import Engine

    state = tmp_path_factory.mktemp("persona-state")
    personas = PersonaSet.load([cards / "shop" / "ava.yaml", cards / "npc" / "brann.yaml"], state)
    engine = Engine.from_folder(tiny_model_dir, max_num_seqs=1)
    app = create_app(engine, "tiny")
    holder: dict = {}
    attach_personas(app, personas, backend=lambda persona, req: holder["model"])
    with serve_app(app) as client:
        yield client, holder, state
    engine.shutdown()


@contextmanager
def serve_app(app) -> Iterator[OpenAI]:
    """Serve ``app`` with uvicorn on a free loopback port; yield an official openai client for it."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0,
                     timeout=600)
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()


def ask(client, persona: str, messages: list[dict] | str, user: str | None = None, **kw):
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    extra = {"user": user} if user else {}
    return client.chat.completions.create(model=f"persona:{persona}", messages=messages, **extra, **kw)


def test_personas_are_models_and_bad_requests_are_400(served):
    client, holder, _ = served
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "persona:ava", "persona:brann"]
    import openai

    with pytest.raises(openai.NotFoundError, match="persona:nobody"):
        ask(client, "nobody", "hi")
    with pytest.raises(openai.BadRequestError, match="tools is not supported with a persona"):
        ask(client, "ava", "hi", tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="last message must be a non-empty user message"):
        ask(client, "ava", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_customer_service_answers_from_the_policy_pages_in_character(served):
    client, holder, _ = served
    holder["model"] = model = ScriptedModel(["You can return items within 30 days of delivery [1]."])
    r = ask(client, "ava", "How many days do I have to return an item?", user="alice")
    assert r.choices[0].message.content == "You can return items within 30 days of delivery [1]."
    assert r.model == "persona:ava"
    system = model.requests[0][0]
    assert system["role"] == "system" and system["content"].startswith("You are ava, the customer-service assistant")
    assert "Never refund without the customer's explicit confirmation." in system["content"]
    assert "(returns.md)" in system["content"] and "within 30 days of delivery" in system["content"]
    assert [t["function"]["name"] for t in model.tools_seen[0]][:2] == ["lookup_order", "refund_order"]
    trace = r.model_extra["persona"]["trace"]
    assert trace[0]["type"] == "persona" and trace[1]["type"] == "retrieval" and trace[1]["best_score"] >= 0.3


def test_customer_service_declines_and_hands_over_without_the_model(served):
    client, holder, state = served
    holder["model"] = model = ScriptedModel([])
    declined = ask(client, "ava", "Can you do my Python homework?", user="bob")
    assert declined.choices[0].message.content.startswith("I can only help with Lumen Outfitters")
    assert declined.model_extra["persona"]["trace"][-1]["guardrail"] == "declined"
    handed = ask(client, "ava", "What is the airspeed velocity of an unladen swallow?", user="bob")
    assert handed.choices[0].message.content.startswith("I don't have an answer to that in our policies")
    trace = handed.model_extra["persona"]["trace"]
    assert trace[-1]["guardrail"] == "ungrounded" and trace[-2]["name"] == "handoff_to_human"
    assert model.requests == []  # neither reached the model
    with sqlite3.connect(state / "ava" / "shop.sqlite") as db:
        rows = db.execute("SELECT user, kind, summary FROM tickets").fetchall()
    assert rows == [("bob", "handoff", "no answer in the knowledge base: What is the airspeed velocity of an "
                                       "unladen swallow?")]


def test_refund_needs_the_customers_yes_in_a_later_message(served):
    client, holder, state = served
    holder["model"] = model = ScriptedModel([
        [("lookup_order", {"order_id": "1001"})],
        [("refund_order", {"order_id": "1001"})],
        [("confirm_refund", {"order_id": "1001"})],  # a model that does not wait: refused by the tool
        "I have prepared a refund of 129 EUR for order 1001. Reply yes to confirm.",
        [("confirm_refund", {"order_id": "1001"})],
        "Done: 129 EUR are on their way back to your card.",
    ])
    first = [{"role": "user", "content": "Please refund my order 1001, the shoes do not fit."}]
    r1 = ask(client, "ava", first, user="alice")
    tools = [t for t in r1.model_extra["persona"]["trace"] if t["type"] == "tool"]
    assert [t["name"] for t in tools] == ["lookup_order", "refund_order", "confirm_refund"]
    assert '"status": "delivered"' in tools[0]["result"] and '"awaiting_confirmation"' in tools[1]["result"]
    assert "has not confirmed" in tools[2]["error"]
    with sqlite3.connect(state / "ava" / "shop.sqlite") as db:
        assert db.execute("SELECT state FROM refunds WHERE order_id = '1001'").fetchone() == ("pending",)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "yes"}]
    r2 = ask(client, "ava", second, user="alice")
    assert r2.choices[0].message.content.startswith("Done: 129 EUR")
    [confirm] = [t for t in r2.model_extra["persona"]["trace"] if t["type"] == "tool"]
    assert confirm["error"] is None and '"refunded"' in confirm["result"]
    with sqlite3.connect(state / "ava" / "shop.sqlite") as db:
        assert db.execute("SELECT state FROM refunds WHERE order_id = '1001'").fetchone() == ("done",)


def test_npc_remembers_each_player_and_stays_in_world(served):
    client, holder, _ = served
    holder["model"] = model = ScriptedModel(["Welcome to my forge, Tilda.", "Aye, Tilda the wolf hunter!",
                                             "Never seen you before, stranger."])
    ask(client, "brann", "Hello! My name is Tilda and I hunt wolves on the north road.", user="tilda")
    # a new conversation, later: the earlier message is recalled for the same player only
    again = ask(client, "brann", "Do you remember me, smith?", user="tilda")
    assert again.choices[0].message.content == "Aye, Tilda the wolf hunter!"
    assert "What tilda told you in earlier conversations:\n- Hello! My name is Tilda" in model.requests[1][0]["content"]
    assert any(t["type"] == "memory" for t in again.model_extra["persona"]["trace"])
    ask(client, "brann", "Do you remember me, smith?", user="bob")
    assert "Tilda" not in model.requests[2][0]["content"] and "earlier conversations" not in model.requests[2][0]["content"]
    assert "Wolves have been seen on the north road" in model.requests[2][0]["content"]  # world facts
    out = ask(client, "brann", "Can you fix my smartphone?", user="tilda")
    assert out.choices[0].message.content.startswith("*Brann frowns")
    assert len(model.requests) == 3  # the decline never reached the model


def test_streamed_persona_answer(served):
    client, holder, _ = served
    holder["model"] = ScriptedModel([[("lookup_order", {"order_id": "1002"})], "Order 1002, a 2-person tent, has "
                                                                              "shipped."])
    chunks = list(ask(client, "ava", "Where is my order 1002?", user="bob", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Order 1002, a 2-person tent, has shipped."
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop" and last.model_extra["persona"]["steps"] == 2


def test_serve_rejects_a_bad_card_before_loading_the_model(tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    card = write_card(tmp_path, "name: x\nmemroy: {enabled: true}\n")
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "no-model"), "--port", "0", "--persona", str(card)])
    assert res.exit_code == 1 and "memroy: unknown key" in res.output


def test_smollm2_npc_answers_from_its_world_facts(smollm2_dir, cards, tmp_path):
    """SmolLM2-135M-Instruct as persona:brann through the server's default (engine) backend: the card's world facts
    reach the model.  (Recalling a player's name from memory is beyond this model: it invents one, with the memory
    in the system prompt or replayed as history; docs/agents.md.)"""
    from lmforge.agent.persona_http import attach_personas
    from lmforge.serve.api import create_app
    from lmforge.serve.engine import Engine

    engine = Engine.from_folder(smollm2_dir, max_num_seqs=1, max_model_len=2048)
    app = create_app(engine, "smollm2")
    attach_personas(app, PersonaSet.load([cards / "npc" / "brann.yaml"], tmp_path / "state"))
    try:
        with serve_app(app) as client:
            r = ask(client, "brann", "How much does a sword cost?", user="p1", max_tokens=16)
    finally:
        engine.shutdown()
    assert "40 silver" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 16 and r.model_extra["persona"]["steps"] == 1


def test_chat_with_a_persona_in_the_terminal(cards, tmp_path, monkeypatch):
    """`lmforge chat MODEL --persona CARD`: piped messages, answers only; the decline needs no model."""
    from test_serve import _build_serve_model
    from typer.testing import CliRunner

    from lmforge.cli import app

    tiny_model_dir = tmp_path / "tiny"
    _build_serve_model(tiny_model_dir, ctx=2048)
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(app, ["chat", str(tiny_model_dir), "--persona", str(cards / "npc" / "brann.yaml"),
                                   "--user", "tilda", "--max-tokens", "4", "--temperature", "0"],
                             input="Can you fix my smartphone?\nHello there\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("*Brann frowns and wipes his hands on his apron.*")
    assert "Stopped" not in res.stdout  # the tiny model answered the second message (4 random tokens)
    memory = tmp_path / "home" / "personas" / "brann" / "memory.sqlite"
    import sqlite3

    with sqlite3.connect(memory) as db:
        said = [r[0] for r in db.execute("SELECT content FROM memory WHERE user = 'tilda' ORDER BY at")]
    assert said == ["Can you fix my smartphone?", "Hello there"]
    bad = CliRunner().invoke(app, ["chat", str(tiny_model_dir), "--persona", str(tmp_path / "none.yaml")])
    assert bad.exit_code == 1 and "none.yaml: file not found" in bad.stderr
