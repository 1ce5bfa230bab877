"""Per-annotator access in labelling: items shared out k annotators per item, each annotator's own token opens only
their assignment on a dashboard that requires a token (other pages, other annotators and the exports are refused),
the admin (the dashboard token) sees everything, and the agreement is reported per pair of annotators."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from lmforge.dashboard.app import create_app
from lmforge.dashboard.labels import Labelling, cohen_kappa

BASE = "http://127.0.0.1:8765"
ORIGIN = {"Origin": BASE}
ADMIN = "admin-secret"


@pytest.fixture()
def dash(lmforge_home, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}?",
                                         "answers": [f"one {i}", f"two {i}"]}) + "\n" for i in range(6)))
    app = create_app(lmforge_home, token=ADMIN)
    admin = TestClient(app, base_url=BASE, raise_server_exceptions=False,
                       headers={"Authorization": f"Bearer {ADMIN}"})
    csrf = app.state.guard.csrf_token
    r = admin.post("/label", data={"csrf": csrf, "name": "shared", "items": str(items),
                                   "annotators": "alice, bob, carol", "overlap": "2"},
                   headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303, r.text
    return app, admin, csrf


def _annotator(app, admin, who: str) -> TestClient:
    """A browser of annotator ``who``: signs in with the link the admin sees on the project page."""
    page = admin.get("/label/shared").text
    link = re.search(rf'data-annotator="{who}".*?value="([^"]+)"', page, re.S).group(1)
    c = TestClient(app, base_url=BASE, raise_server_exceptions=False)
    r = c.get(link.removeprefix(BASE), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/label/shared/as/{who}"
    return c


def _label_all(c: TestClient, csrf: str, who: str, choose) -> list[str]:
    done = []
    while True:
        page = c.get(f"/label/shared/as/{who}").text
        m = re.search(rf'action="/label/shared/as/{who}/(q\d)"', page)
        if m is None:
            assert 'id="finished"' in page
            return done
        r = c.post(f"/label/shared/as/{who}/{m.group(1)}", data={"csrf": csrf, "choice": choose(m.group(1))},
                   headers=ORIGIN, follow_redirects=False)
        assert r.status_code == 303, r.text
        done.append(m.group(1))


def test_annotators_see_and_edit_only_their_assignment(dash):
    app, admin, csrf = dash
    alice = _annotator(app, admin, "alice")
    # items i go to annotators i % 3 and (i + 1) % 3: alice (0) gets q0, q2, q3, q5
    assert _label_all(alice, csrf, "alice", lambda q: "a") == ["q0", "q2", "q3", "q5"]
    for path in ("/label/shared/as/bob", "/runs", "/label/shared", "/label/shared/export?kind=sft", "/feedback",
                 "/api/runs"):
        r = alice.get(path, follow_redirects=False)
        assert r.status_code == 403 and "only" in r.text, path
    assert alice.get("/label", follow_redirects=False).headers["location"] == "/label/shared/as/alice"
    r = alice.post("/label/shared/as/bob/q1", data={"csrf": csrf, "choice": "a"}, headers=ORIGIN)
    assert r.status_code == 403  # another annotator's labels: refused
    r = admin.post("/label/shared/as/alice/q1", data={"csrf": csrf, "choice": "a"}, headers=ORIGIN)
    assert r.status_code == 403 and "not in alice&#39;s assignment" in r.text  # q1 is bob's and carol's
    stranger = TestClient(app, base_url=BASE, raise_server_exceptions=False)
    assert stranger.get("/?annotator_token=guess", follow_redirects=False).status_code == 401
    assert stranger.get("/label/shared/as/alice").status_code == 401

    bob, carol = _annotator(app, admin, "bob"), _annotator(app, admin, "carol")
    assert _label_all(bob, csrf, "bob", lambda q: "a" if q in ("q0", "q1") else "b") == ["q0", "q1", "q3", "q4"]
    assert _label_all(carol, csrf, "carol", lambda q: "a") == ["q1", "q2", "q4", "q5"]
    page = admin.get("/label/shared").text  # the admin sees every annotator's progress and the agreement
    assert len(re.findall(r'<td class="n">4 / 4</td>', page)) == 3
    got = Labelling(app.state.store.home).agreement("shared")["choice"]
    pairs = {tuple(p["annotators"]): (p["kappa"], p["items"]) for p in got["by_pair"]}
    # shared items: alice-bob q0, q3; alice-carol q2, q5; bob-carol q1, q4
    assert pairs[("alice", "bob")] == (pytest.approx(cohen_kappa([("a", "a"), ("a", "b")])), 2)
    assert pairs[("alice", "carol")] == (1.0, 2) and pairs[("bob", "carol")][1] == 2
    assert "alice · bob: κ =" in page
    export = admin.get("/label/shared/export", params={"kind": "preference"})
    assert export.status_code == 200 and len(export.text.splitlines()) == 12


def test_bad_assignment_settings_are_messages(dash, tmp_path):
    app, admin, csrf = dash
    items = tmp_path / "i.jsonl"
    items.write_text(json.dumps({"prompt": "p", "answers": ["x"]}) + "\n")
    for overlap, words in (("3", "1 to 2"), ("x", "whole number"), ("0", "1 to 2")):
        r = admin.post("/label", data={"csrf": csrf, "name": f"p{overlap}", "items": str(items),
                                       "annotators": "a, b", "overlap": overlap}, headers=ORIGIN)
        assert r.status_code == 400 and words in r.text, (overlap, r.text)
    r = admin.post("/label", data={"csrf": csrf, "name": "dup", "items": str(items), "annotators": "a, a"},
                   headers=ORIGIN)
    assert r.status_code == 400 and "twice" in r.text
