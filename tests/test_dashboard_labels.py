"""Labelling: a project from a JSONL of prompts + answers, labels from two annotators, exports that `lmforge sft` /
`lmforge dpo` read, Cohen's kappa, and clear messages for bad input (no labels, unknown annotator)."""

import json
import re

import pytest
from fastapi.testclient import TestClient

from lmforge.dashboard.app import create_app
from lmforge.dashboard.labels import cohen_kappa

ORIGIN = {"Origin": "http://127.0.0.1:8765"}


@pytest.fixture()
def dash(lmforge_home, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}?",
                                         "answers": [{"model": "m1", "text": f"answer one {i}"},
                                                     {"model": "m2", "text": f"answer two {i}"}]}) + "\n"
                             for i in range(4)))
    app = create_app(lmforge_home)
    c = TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
    return c, app.state.guard.csrf_token, items


def post(c, url, csrf, **data):
    return c.post(url, data={"csrf": csrf, **data}, headers=ORIGIN, follow_redirects=False)


def test_cohen_kappa():
    assert cohen_kappa([(1, 1), (2, 2), (3, 3)]) == 1.0
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    # 4 items, raters agree on 3: po = .75, pe = (2*3 + 2*1) / 16 = .5 → kappa .5
    assert cohen_kappa([("a", "a"), ("a", "a"), ("b", "a"), ("b", "b")]) == pytest.approx(0.5)


def test_label_export_and_agreement(dash, tmp_path):
    c, csrf, items = dash
    assert post(c, "/label", csrf, name="p1", items=str(items), annotators="alice, bob",
                guidelines="be kind").status_code == 303
    assert "Nothing" not in c.get("/label/p1").text and "0 / 4" in c.get("/label/p1").text
    # export before any label: a message, not an empty file or a trace
    r = c.get("/label/p1/export", params={"kind": "sft"})
    assert r.status_code == 404 and "nothing to export" in r.text and "Traceback" not in r.text
    for who, choices in (("alice", "aabb"), ("bob", "aaba")):
        for k in range(4):
            page = c.get(f"/label/p1/as/{who}").text
            item = re.search(r'action="/label/p1/as/' + who + r'/(q\d)"', page).group(1)
            assert item == f"q{k}" and f"{k} / 4" in page
            r = post(c, f"/label/p1/as/{who}/{item}", csrf, rating=str(5 - k % 2), choice=choices[k],
                     tags="ok", edited=f"gold {k} by {who}" if k < 2 else "")
            assert r.status_code == 303
        assert 'id="finished"' in c.get(f"/label/p1/as/{who}").text
    sft = [json.loads(l) for l in c.get("/label/p1/export", params={"kind": "sft"}).text.splitlines()]
    assert len(sft) == 4 and sft[0]["messages"][0] == {"role": "user", "content": "question 0?"}
    assert {s["messages"][1]["content"] for s in sft} == {f"gold {k} by {w}" for k in (0, 1) for w in ("alice", "bob")}
    pref = [json.loads(l) for l in c.get("/label/p1/export", params={"kind": "preference"}).text.splitlines()]
    assert len(pref) == 8
    q2_bob = next(p for p in pref if p["meta"]["item"] == "q2" and p["meta"]["annotator"] == "bob")
    assert q2_bob["chosen"] == "answer two 2" and q2_bob["rejected"] == "answer one 2"
    # the exports are what the stages read
    from lmforge.align.chat_data import read_conversations
    from lmforge.align.dpo import pair_to_conversations

    (tmp_path / "sft.jsonl").write_text(c.get("/label/p1/export", params={"kind": "sft"}).text)
    assert len(list(read_conversations(tmp_path / "sft.jsonl"))) == 4
    chosen, rejected = pair_to_conversations(pref[0], "export")
    assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
    page = c.get("/label/p1").text
    assert "4 / 4" in page and "Cohen" in page
    m = re.search(r"<th>choice</th><td>Cohen&#39;s κ = ([-0-9.]+)", page) or re.search(
        r"<th>choice</th><td>Cohen's κ = ([-0-9.]+)", page)
    assert float(m.group(1)) == pytest.approx(cohen_kappa(list(zip("aabb", "aaba"))))


def test_bad_labelling_input_is_a_message(dash, tmp_path):
    c, csrf, items = dash
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answers": ["a"]}\n{"no prompt": 1}\n')
    r = post(c, "/label", csrf, name="p2", items=str(bad), annotators="alice")
    assert r.status_code == 400 and "bad.jsonl:2" in r.text
    r = post(c, "/label", csrf, name="../evil", items=str(items), annotators="alice")
    assert r.status_code == 400 and "project" in r.text
    post(c, "/label", csrf, name="p3", items=str(items), annotators="alice")
    assert c.get("/label/p3/as/mallory").status_code == 403
    assert post(c, "/label/p3/as/alice/q0", csrf, rating="9").status_code == 400
    assert post(c, "/label/p3/as/alice/nope", csrf, rating="3").status_code == 404
    assert c.post("/label/p3/as/alice/q0", data={"rating": "3"}, headers=ORIGIN).status_code == 403  # no CSRF token
