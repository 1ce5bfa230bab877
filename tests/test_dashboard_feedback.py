"""The dashboard's Feedback page: answers recorded by ``lmforge serve --record`` and the feedback on them, listed,
filtered and opened in headless Chromium (Playwright over Debian's chromium, as test_dashboard_browser), and the
messages shown when nothing is recorded or the file is corrupt (TestClient)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from lmforge.artifacts import StageRun
from lmforge.dashboard.app import create_app
from lmforge.feedback.store import Recorder

ROOT = Path(__file__).resolve().parents[1]


def _recordings(home: Path) -> str:
    """A serve run in the registry of ``home`` and three recorded answers with feedback; the serve run id."""
    os.environ["LMFORGE_HOME"] = str(home)  # (the per-test fixture's monkeypatch restores it)
    run = StageRun("serve", "1", home / "serve" / "tiny-1", {"model": "/models/tiny", "model_name": "tiny"})
    with run:
        rec = Recorder(home / "feedback.sqlite", run.run_id, str(run.dir.resolve()), "/models/tiny", "tiny",
                       "sha256:feed")
        q = [{"role": "user", "content": "What is a tuple?"}]
        rec.record("chatcmpl-a", "chat", {"messages": q}, {"temperature": 1.0, "seed": 1},
                   [{"text": "An immutable sequence.", "finish_reason": "stop"},
                    {"text": "A kind of fish.", "finish_reason": "stop"}], 7, 9, 0.25)
        rec.record("chatcmpl-b", "chat", {"messages": [{"role": "user", "content": "Explain len"}]}, {},
                   [{"text": "It counts items.", "finish_reason": "stop"}], 5, 4, 0.1)
        rec.record("cmpl-c", "completion", {"prompt": ["The for statement"]}, {}, [{"text": " loops", "finish_reason":
                                                                                     "length"}], 3, 1, 0.05)
        rec.add_feedback("chatcmpl-a", 0, "up", None, None, "alice")
        rec.add_feedback("chatcmpl-a", 1, "down", "A tuple is an immutable sequence.", "not a fish", "bob")
        rec.add_feedback("chatcmpl-b", 0, "up", None, None, "alice")
        rec.close()
    return run.run_id


def test_feedback_page_messages_without_or_with_corrupt_recordings(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    client = TestClient(create_app(home), raise_server_exceptions=False)
    r = client.get("/feedback")
    assert r.status_code == 200 and "lmforge serve MODEL --record" in r.text
    assert client.get("/feedback/chatcmpl-x").status_code == 404
    (home / "feedback.sqlite").write_bytes(b"this is not a database" * 100)
    r = client.get("/feedback")
    assert r.status_code == 503 and "cannot be read" in r.text and "Traceback" not in r.text
    assert client.get("/feedback", params={"rating": "sideways"}).status_code in (400, 503)


def test_feedback_api_filters(tmp_path):
    serve_run = _recordings(tmp_path / "home")
    client = TestClient(create_app(tmp_path / "home"), raise_server_exceptions=False)
    ids = lambda **p: [r["id"] for r in client.get("/api/feedback", params=p).json()["responses"]]  # noqa: E731
    assert ids() == ["cmpl-c", "chatcmpl-b", "chatcmpl-a"]
    assert ids(rating="down") == ["chatcmpl-a"] and ids(rating="corrected") == ["chatcmpl-a"]
    assert ids(rating="none") == ["cmpl-c"] and ids(annotator="alice") == ["chatcmpl-b", "chatcmpl-a"]
    assert ids(rating="down", annotator="alice") == [] and ids(q="tuple") == ["chatcmpl-a"]
    assert ids(serve_run=serve_run) == ids() and ids(serve_run="other") == []
    head = client.get("/api/feedback").json()["summary"]
    assert (head["responses"], head["up"], head["down"], head["corrections"]) == (3, 2, 1, 1)
    assert client.get("/api/feedback", params={"rating": "sideways"}).status_code == 400


def test_export_launched_from_the_dashboard(tmp_path):
    """The Feedback page's export link: a feedback_export job from the Launch form's API, run as a subprocess."""
    import json

    home = tmp_path / "home"
    serve_run = _recordings(home)
    app = create_app(home)
    c = TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
    assert 'href="/launch/feedback_export"' in c.get("/feedback").text
    assert 'name="max_pairs_per_prompt"' in c.get("/launch/feedback_export").text
    out = tmp_path / "export"
    job = c.post("/api/jobs", json={"stage": "feedback_export", "config": {"format": "dpo"}, "out": str(out)},
                 headers={"Origin": "http://127.0.0.1:8765", "X-CSRF-Token": app.state.guard.csrf_token}).json()
    deadline = time.time() + 180
    while c.get(f"/api/jobs/{job['id']}").json()["state"] == "running":
        assert time.time() < deadline, "the export job did not finish"
        time.sleep(0.5)
    assert c.get(f"/api/jobs/{job['id']}").json()["state"] == "done"
    pairs = [json.loads(l) for l in (out / "dpo.jsonl").read_text().splitlines()]
    # chatcmpl-a: the correction beats the down-rated answer, the up-rated answer beats it too
    assert sorted(p["chosen"] for p in pairs) == ["A tuple is an immutable sequence.", "An immutable sequence."]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["serve"]["fingerprint"] == f"run:{serve_run}"


CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def test_feedback_page_in_a_browser(tmp_path):
    import shutil
    import socket

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="PyPI playwright is not installed (the test extra)")
    home = tmp_path / "home"
    serve_run = _recordings(home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "dashboard", "--port", str(port)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT), LMFORGE_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/api/feedback", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, "dashboard did not start"
            time.sleep(0.3)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/runs")
            page.click("header nav >> text=Feedback")
            page.wait_for_url("**/feedback")
            assert page.inner_text("h1") == "Feedback"
            assert page.locator("#responses tbody tr").count() == 3
            assert "3 recorded answers" in page.inner_text("#summary")
            page.select_option("select[name=rating]", "down")
            page.wait_for_url("**rating=down**")
            rows = page.locator("#responses tbody tr")
            assert rows.count() == 1 and rows.first.get_attribute("data-id") == "chatcmpl-a"
            page.select_option("select[name=rating]", "")
            page.fill("input[name=q]", "len")
            page.click("#filters button[type=submit]")
            page.wait_for_url("**q=len**")
            assert [rows.nth(i).get_attribute("data-id") for i in range(rows.count())] == ["chatcmpl-b"]
            page.goto(url + "/feedback")
            page.click('#responses tr[data-id="chatcmpl-a"] a:has-text("What is a tuple?")')
            page.wait_for_url("**/feedback/chatcmpl-a")
            assert page.locator("section.choice").count() == 2
            second = page.locator('section.choice[data-choice="1"]')
            assert "A kind of fish." in second.locator("pre.answer").inner_text()
            assert second.locator("td.correction").inner_text() == "A tuple is an immutable sequence."
            assert "bob" in second.locator("table.feedback").inner_text()
            page.click("#serve-run")
            page.wait_for_url(f"**/runs/{serve_run}")
            assert "serve" in page.inner_text("h1")
            page.click("#feedback-link")  # and back: the serve run's recorded answers
            page.wait_for_url(f"**/feedback?serve_run={serve_run}")
            assert page.locator("#responses tbody tr").count() == 3
            assert errors == []
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
