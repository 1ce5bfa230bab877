"""Feedback from production, in process: a recording server (``create_app(recorder=...)``) stores every answer the
official ``openai`` client gets (chat, streamed chat, completions), ``POST /v1/feedback`` attaches thumbs and
corrections (bad bodies are 400s naming the field), and ``feedback.export.build`` turns them into SFT / DPO records.
The whole loop through the CLI (serve → feedback → export → dpo → eval → lineage) is ``test_feedback_e2e.py``."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from lmforge.feedback import export
from lmforge.feedback.store import Recorder, load, read_only
from lmforge.serve.engine import Engine
from lmforge.serve.smoke import running_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine.from_folder(tiny_model_dir, max_num_seqs=4, max_model_len=None)
    yield eng
    eng.shutdown()


@pytest.fixture
def recorded(engine, tmp_path):
    db = tmp_path / "feedback.sqlite"
    rec = Recorder(db, "servrun1", str(tmp_path / "serve"), "/models/tiny", NAME, "sha256:abc")
    with running_server(engine, NAME, recorder=rec) as url:
        yield url, db
    rec.close()


def _post(url: str, body) -> httpx.Response:
    return httpx.post(url.removesuffix("/v1") + "/v1/feedback", json=body, timeout=30)


def test_answers_are_recorded_and_take_feedback(recorded):
    url, db = recorded
    client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "What is a list?"}]
    two = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, n=2, temperature=1.0, seed=3)
    streamed = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0.0, stream=True)
    stream_id, stream_text = None, ""
    for chunk in streamed:
        stream_id = chunk.id
        stream_text += "".join(c.delta.content or "" for c in chunk.choices)
    plain = client.completions.create(model=NAME, prompt="The for statement", max_tokens=4, temperature=0.0)

    with closing_ro(db) as con:
        rows = {r["id"]: r for r in load(con)}
    assert set(rows) == {two.id, stream_id, plain.id}
    r = rows[two.id]
    assert r["endpoint"] == "chat" and r["serve_run"] == "servrun1" and r["model_lineage"] == "sha256:abc"
    assert r["request"]["messages"] == msgs
    assert [c["text"] for c in r["choices"]] == [c.message.content for c in two.choices]
    assert r["params"]["seed"] == 3 and r["params"]["n"] == 2 and r["params"]["max_tokens"] == 6
    assert r["completion_tokens"] == two.usage.completion_tokens and r["latency_s"] > 0
    assert rows[stream_id]["choices"][0]["text"] == stream_text  # the stream's whole text
    assert rows[plain.id]["endpoint"] == "completion"
    assert rows[plain.id]["choices"][0]["text"] == plain.choices[0].text

    ok = _post(url, {"response_id": two.id, "choice": 1, "rating": "down", "correction": "A list is a sequence.",
                     "annotator": "ann"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["object"] == "feedback" and ok.json()["id"].startswith("fb-")
    assert _post(url, {"response_id": two.id, "rating": "up"}).status_code == 200
    with closing_ro(db) as con:
        fb = {r["id"]: r for r in load(con)}[two.id]["feedback"]
    assert [(f["choice"], f["rating"], f["correction"], f["annotator"]) for f in fb] == [
        (1, "down", "A list is a sequence.", "ann"), (0, "up", None, None)]


def closing_ro(db):
    from contextlib import closing

    return closing(read_only(db))


@pytest.mark.parametrize("body, status, param, words", [
    ({"response_id": "x", "rating": "meh"}, 400, "rating", "'up' or 'down'"),
    ({"rating": "up"}, 400, "response_id", "Field required"),
    ({"response_id": "x", "rating": "up", "choise": 1}, 400, "choise", "Extra inputs"),
    ({"response_id": "x", "rating": "up", "choice": -1}, 400, "choice", "greater than or equal"),
    ({"response_id": "x", "rating": "up", "correction": ""}, 400, "correction", "at least 1"),
    ({"response_id": "chatcmpl-nope", "rating": "up"}, 404, "response_id", "no recorded response"),
    ([1, 2], 400, None, "valid dictionary"),
])
def test_bad_feedback_is_a_400_naming_the_field(recorded, body, status, param, words):
    url, _ = recorded
    resp = _post(url, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_choice_out_of_range_and_server_without_record(recorded, engine):
    url, _ = recorded
    client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    one = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    resp = _post(url, {"response_id": one.id, "choice": 1, "rating": "up"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "choice"
    assert "1 choice(s)" in resp.json()["error"]["message"]
    with running_server(engine, NAME) as plain:  # no --record: nothing to attach feedback to
        resp = _post(plain, {"response_id": one.id, "rating": "up"})
    assert resp.status_code == 400 and "--record" in resp.json()["error"]["message"]


def _response(rid, messages, texts, feedback, endpoint="chat", created=0.0):
    return {"id": rid, "serve_run": "s1", "endpoint": endpoint, "created": created, "model_lineage": "run:m",
            "request": {"messages": messages}, "choices": [{"text": t} for t in texts],
            "feedback": [{"id": i, "choice": c, "rating": r, "correction": cor, "annotator": a}
                         for i, (c, r, cor, a) in enumerate(feedback)]}


def test_export_rules_sft_and_dpo():
    q = [{"role": "user", "content": "q?"}]
    other = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "other?"}]
    responses = [
        _response("r1", q, ["good one", "bad one"], [(0, "up", None, "a"), (1, "down", None, "a")]),
        _response("r2", q, ["also bad"], [(0, "down", None, "a"), (0, "down", None, "b")], created=1),
        _response("r3", other, ["wrong"], [(0, "down", "right", "a")], created=2),
        # annotator a changed their mind (newest wins), b disagrees: a tie, not used
        _response("r4", other, ["meh"], [(0, "down", None, "a"), (0, "up", None, "a"), (0, "down", None, "b")],
                  created=3),
        _response("r5", q, ["x"], [(0, "up", None, None)], endpoint="completion", created=4),
        _response("r6", q, ["no feedback"], []),
    ]
    sft, skipped, used = export.build(responses, "sft")
    assert [(r["messages"][-1]["content"], r["meta"]["response_id"]) for r in sft] == [("good one", "r1"),
                                                                                        ("right", "r3")]
    assert sft[1]["messages"][:2] == other and sft[1]["meta"]["corrected"] is True
    assert skipped["completion_endpoint"] == 1 and used == {"s1"}

    dpo, skipped, _ = export.build(responses, "dpo")
    pairs = sorted((r["chosen"], r["rejected"]) for r in dpo)
    assert pairs == [("good one", "also bad"), ("good one", "bad one"), ("right", "wrong")]
    assert skipped["tied_votes"] == 1
    by_b = export.build(responses, "dpo", {"b"})[0]  # only annotator b's votes: no up answer, no correction
    assert by_b == []
    capped, skipped, _ = export.build(responses, "dpo", max_pairs_per_prompt=1)
    assert sorted((r["chosen"], r["rejected"]) for r in capped) == [("good one", "bad one"), ("right", "wrong")]
    assert skipped["over_max_pairs_per_prompt"] == 1
    # what dpo reads: the records pass its own validation
    from lmforge.align.dpo import pair_to_conversations

    for r in dpo:
        chosen, rejected = pair_to_conversations(json.loads(json.dumps(r)), "x")
        assert chosen[-1]["role"] == "assistant" and chosen[:-1] == rejected[:-1]


def test_export_with_nothing_usable_says_why(tmp_path):
    from lmforge.feedback.store import Recorder

    db = tmp_path / "f.sqlite"
    Recorder(db, "s", str(tmp_path), "m", "m", "sha256:x").close()
    with pytest.raises(ValueError, match="nothing to export .* 0 recorded answers"):
        export.run(export.Config(db=str(db)), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--record"):
        export.run(export.Config(db=str(tmp_path / "missing.sqlite")), tmp_path / "out")


def test_a_failed_recording_does_not_fail_the_answer(engine, tmp_path, caplog):
    import sqlite3

    rec = Recorder(tmp_path / "f.sqlite", "s", str(tmp_path), "m", NAME, "sha256:x")

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    rec.record = broken
    with running_server(engine, NAME, recorder=rec) as url:
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    rec.close()
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert f"could not record response {answer.id}" in caplog.text


def test_answers_of_a_chat_hook_are_recorded_too(engine, tmp_path, monkeypatch):
    """A hook (RAG, a persona) that answers a chat request: its (non-streamed) answer is recorded and takes feedback."""
    import lmforge.serve.smoke as smoke
    from lmforge.serve.openai import add_chat_hook

    rec = Recorder(tmp_path / "f.sqlite", "s", str(tmp_path), "m", NAME, "sha256:x")

    async def kb(req, request):
        return {"id": "chatcmpl-kb1", "object": "chat.completion", "created": 0, "model": NAME,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "From the handbook."},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}

    def app_with_hook(*args, create=smoke.create_app, **kwargs):
        app = create(*args, **kwargs)
        add_chat_hook(app, kb)
        return app

    monkeypatch.setattr(smoke, "create_app", app_with_hook)  # running_server builds its app with it
    with running_server(engine, NAME, recorder=rec) as url:
        client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "vacation?"}])
        assert _post(url, {"response_id": answer.id, "rating": "up"}).status_code == 200
    rec.close()
    with closing_ro(tmp_path / "f.sqlite") as con:
        (row,) = load(con)
    assert row["id"] == "chatcmpl-kb1" and row["choices"][0]["text"] == "From the handbook."
    assert row["completion_tokens"] == 3 and [f["rating"] for f in row["feedback"]] == ["up"]
