"""Serving monitor and playground against a real `lmforge serve` app (tiny model, uvicorn on loopback), through the
dashboard's HTTP endpoints; unreachable servers are a message, not a stack trace."""

import json
import socket

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from test_serve import _build_serve_model

from lmforge.dashboard.app import create_app
from lmforge.dashboard.monitor import quantile
from lmforge.serve.engine import Engine
from lmforge.serve.smoke import running_server

NAME = "tiny-chat"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash-serve") / NAME
    _build_serve_model(folder)
    engine = Engine.from_folder(folder, max_num_seqs=4, max_model_len=None)
    with running_server(engine, NAME) as url:
        yield url
    engine.shutdown()


@pytest.fixture()
def dash(lmforge_home):
    app = create_app(lmforge_home)
    return TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False), app


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _chat(c, app, base_url, content, **kw):
    body = {"base_url": base_url, "model": NAME, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 12, **kw}
    with c.stream("POST", "/api/playground/chat", json=body,
                  headers={"Origin": "http://127.0.0.1:8765", "X-CSRF-Token": app.state.guard.csrf_token}) as r:
        return r.status_code, "".join(r.iter_text())


def test_histogram_quantiles():
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 10.0), (float("inf"), 10.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * (5 - 2) / 4)
    assert quantile(buckets, 0.1) == pytest.approx(0.05)
    assert quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_playground_streams_the_same_answer_as_the_openai_client(server, dash):
    c, app = dash
    assert c.get("/api/playground/models", params={"base_url": server}).json() == {"models": [NAME]}
    status, body = _chat(c, app, server, "What is a list?")
    assert status == 200
    chunks = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: {")]
    streamed = "".join((ch["choices"][0]["delta"].get("content") or "") for ch in chunks if ch["choices"])
    assert "data: [DONE]" in body
    direct = OpenAI(base_url=server, api_key="none").chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is a list?"}], temperature=0, max_tokens=12)
    assert streamed == direct.choices[0].message.content and streamed
    # the playground page itself
    assert 'id="prompt"' in c.get("/playground", params={"base_url": server}).text


def test_serving_monitor_reads_the_servers_metrics(server, dash):
    c, app = dash
    before = c.get("/api/serving", params={"url": server}).json()
    _chat(c, app, server, "Hello")
    after = c.get("/api/serving", params={"url": server}).json()
    assert after["url"] == server[:-3] + "/metrics"
    assert after["gauges"]["running requests"] == 0 and "waiting requests" in after["gauges"]
    gen = "generated tokens (total)"
    assert after["counters"][gen] > before["counters"].get(gen, 0)
    e2e = after["latency"]["end-to-end latency (s)"]
    assert e2e["count"] >= 1 and e2e["p50"] is not None and e2e["p50"] <= e2e["p99"]
    m = c.get("/api/machine").json()
    assert m["cpus"] >= 1 and 0 < m["ram_total_gb"] and isinstance(m["gpus"], list)
    assert "Serving monitor" in c.get("/serving", params={"url": server}).text


def test_unreachable_or_bad_servers_are_messages(dash):
    c, app = dash
    dead = _closed_port_url()
    r = c.get("/api/serving", params={"url": dead})
    assert r.status_code == 502 and "cannot reach" in r.json()["error"] and "Is the server running" in r.json()["error"]
    assert c.get("/api/serving", params={"url": "file:///etc/passwd"}).status_code == 400
    r = c.get("/api/playground/models", params={"base_url": dead + "/v1"})
    assert r.status_code == 502 and "cannot list models" in r.json()["error"]
    status, body = _chat(c, app, dead + "/v1", "hi")
    assert status == 502 and "cannot reach" in json.loads(body)["error"]
    for text in (c.get("/api/serving", params={"url": dead}).text, body):
        assert "Traceback" not in text
