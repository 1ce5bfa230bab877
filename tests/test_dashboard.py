"""The dashboard over HTTP (FastAPI TestClient): pages and JSON endpoints on a real workspace (data → tokenizer →
tiny pretrain), security (token, Host, CSRF, paths), and bad input shown as messages, never stack traces."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dashboard_fixtures import shared_workspace
from lmforge.config import ConfigError
from lmforge.dashboard.app import create_app
from lmforge.dashboard.security import LOOPBACK_HOSTS


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return shared_workspace(tmp_path_factory)


@pytest.fixture(scope="module")
def client(ws):
    return TestClient(create_app(ws["home"]), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def ids(client):
    return {r["stage"]: r["run_id"] for r in client.get("/api/runs").json()}


def problems(html: str) -> list[str]:
    return re.findall(r'class="problem"[^>]*>([^<]*)', html)


def assert_no_trace(r):
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_runs_list_filters_and_json(client, ws, ids):
    runs = client.get("/api/runs").json()
    assert sorted(r["stage"] for r in runs) == ["data", "pretrain", "tokenizer"]
    assert all(r["state"] == "done" and r["duration_s"] > 0 for r in runs)
    page = client.get("/runs").text
    for run_id in ids.values():
        assert f'href="/runs/{run_id}"' in page
    assert "final_train_loss=" in page  # key metrics of the pretrain run
    only_data = client.get("/runs", params={"stage": "data"}).text
    assert ids["data"] in only_data and ids["pretrain"] not in only_data
    by_text = client.get("/api/runs", params={"q": "runs/tok"}).json()  # its path, or a config naming it
    assert sorted(r["stage"] for r in by_text) == ["pretrain", "tokenizer"]
    assert [r["stage"] for r in client.get("/api/runs", params={"q": ids["data"]}).json()] == ["data"]
    assert client.get("/api/runs", params={"status": "failed"}).json() == []


def test_run_page_shows_config_inputs_users_files(client, ws, ids):
    r = client.get(f"/runs/{ids['tokenizer']}")
    assert r.status_code == 200 and not problems(r.text)
    assert f'href="/runs/{ids["data"]}"' in r.text  # its input, linked
    assert f'href="/runs/{ids["pretrain"]}"' in r.text  # the run that used it
    assert "vocab_size" in r.text and "manifest.json" in r.text
    m = client.get(f"/api/runs/{ids['pretrain']}").json()
    assert m["manifest"]["status"] == "done" and m["run"]["config"]["max_steps"] == 8
    f = client.get(f"/runs/{ids['pretrain']}/file", params={"path": "config.json"})
    assert f.status_code == 200 and "num_hidden_layers" in f.text


def test_metrics_api_reads_every_logged_step(client, ws, ids):
    lines = (ws["model"] / "metrics.jsonl").read_text().splitlines()
    m = client.get(f"/api/runs/{ids['pretrain']}/metrics").json()
    assert [rec["step"] for rec in m["records"]] == [json.loads(l)["step"] for l in lines]
    assert m["offset"] == (ws["model"] / "metrics.jsonl").stat().st_size and m["bad_lines"] == 0
    # a finished run's stream replays from the offset and ends
    with client.stream("GET", f"/api/runs/{ids['pretrain']}/metrics/stream", params={"offset": 0, "poll": 0.1}) as s:
        body = "".join(s.iter_text())
    data = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: {")]
    assert sum(len(d["records"]) for d in data) == len(lines)
    assert "event: end" in body
    curves = client.get("/curves", params={"run": ids["pretrain"]}).text
    assert ids["pretrain"] in curves and 'data-key="loss"' in curves


def test_lineage_goes_back_to_raw_and_forward_to_users(client, ws, ids):
    g = client.get(f"/api/runs/{ids['pretrain']}/lineage").json()
    edges = {(e["src"], e["dst"], e["role"]) for e in g["edges"]}
    assert (f"run:{ids['tokenizer']}", f"run:{ids['pretrain']}", "tokenizer") in edges
    assert (f"run:{ids['data']}", f"run:{ids['tokenizer']}", "data") in edges
    assert any(s == f"raw:{ws['raw'].resolve()}" and d == f"run:{ids['data']}" for s, d, _ in edges)
    down = client.get(f"/api/runs/{ids['data']}/lineage").json()
    assert {n["run_id"] for n in down["nodes"] if n["run_id"]} == set(ids.values())
    page = client.get(f"/runs/{ids['data']}/lineage").text
    assert f'href="/runs/{ids["pretrain"]}"' in page and "<svg" in page
    assert client.get("/lineage", params={"path": str(ws["tok"])}, follow_redirects=False).headers["location"] == \
        f"/runs/{ids['tokenizer']}/lineage"


def test_data_page_counts_and_document_filters(client, ws, ids):
    from lmforge.data.peek import iter_shard

    stats = json.loads((ws["data"] / "stats.json").read_text())
    r = client.get(f"/runs/{ids['data']}/data")
    assert r.status_code == 200 and not problems(r.text)
    for st in stats["steps"]:
        assert st["name"] in r.text
        for reason in st["dropped"]:
            assert reason in r.text
    dropped = list(iter_shard(ws["data"], dropped=True))
    reason = dropped[0]["meta"]["drop_reason"]
    want = [d["id"] for d in dropped if d["meta"]["drop_reason"] == reason]
    r = client.get(f"/runs/{ids['data']}/data", params={"kind": "dropped", "field": "meta.drop_reason",
                                                        "value": reason, "n": 200})
    shown = re.findall(r'<article class="doc"><h3>([^ <]+)', r.text)
    assert shown == want
    r = client.get(f"/runs/{ids['data']}/data", params={"text": "assert statement", "n": 5})
    shown = re.findall(r'<article class="doc"><h3>([^ <]+)', r.text)
    kept = [d["id"] for d in iter_shard(ws["data"]) if "assert statement" in d["text"].lower()][:5]
    assert shown == kept and kept


def test_file_paths_cannot_escape_the_run_folder(client, ws, ids):
    run = ids["tokenizer"]
    outside = ws["tok"].parent / "secret.txt"
    outside.write_text("top secret")
    (ws["tok"] / "link-out").unlink(missing_ok=True)
    os.symlink(outside, ws["tok"] / "link-out")
    try:
        for bad in ("../secret.txt", "../../home/registry.sqlite", "tokens/../../secret.txt", str(outside),
                    "/etc/passwd", "link-out"):
            r = client.get(f"/runs/{run}/file", params={"path": bad})
            assert r.status_code == 403, bad
            assert "top secret" not in r.text and "outside the run folder" in r.text
        r = client.get(f"/runs/{run}/file?path=%2e%2e%2fsecret.txt")
        assert r.status_code == 403
    finally:
        (ws["tok"] / "link-out").unlink()
        outside.unlink()


def test_token_is_required_everywhere_when_set(ws):
    c = TestClient(create_app(ws["home"], token="s3cret"), raise_server_exceptions=False)
    assert c.get("/runs").status_code == 401
    assert c.get("/api/runs").status_code == 401 and "token" in c.get("/api/runs").json()["error"]
    assert c.get("/runs?token=wrong").status_code == 401
    r = c.get("/runs?token=s3cret&stage=data", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs?stage=data"
    assert "lmforge_token" in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/runs").status_code == 200  # the cookie now rides along
    fresh = TestClient(create_app(ws["home"], token="s3cret"))
    assert fresh.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert fresh.get("/api/runs", headers={"X-Lmforge-Token": "s3cret"}).status_code == 200
    assert fresh.get("/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_host_check_and_loopback_rule(ws):
    c = TestClient(create_app(ws["home"], allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8765")
    assert c.get("/runs").status_code == 200
    assert c.get("/runs", headers={"Host": "evil.example:8765"}).status_code == 421
    from lmforge.dashboard.server import serve

    with pytest.raises(ConfigError, match="token"):
        serve("0.0.0.0", 0, None, home=str(ws["home"]))


def test_writes_need_same_origin_and_csrf_token(ws):
    app = create_app(ws["home"])
    c = TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/runs").text).group(1)
    assert csrf == app.state.guard.csrf_token
    same = {"Origin": "http://127.0.0.1:8765"}
    assert c.post("/api/jobs", data={"csrf": csrf}).status_code == 403  # no Origin
    assert c.post("/api/jobs", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/jobs", data={"csrf": "forged"}, headers=same).status_code == 403
    assert c.post("/api/jobs", headers=same).status_code == 403
    passed = c.post("/api/jobs", data={"csrf": csrf}, headers=same)
    assert passed.status_code not in (401, 403)
    assert c.post("/api/jobs", headers={**same, "X-CSRF-Token": csrf}).status_code not in (401, 403)


def _fake_run(home_env: Path, folder: Path, stage: str = "pretrain"):
    """A real StageRun (manifest + registry row) in ``folder``, recorded in $LMFORGE_HOME."""
    from lmforge.artifacts import StageRun

    run = StageRun(stage, "1", folder, {"x": 1})
    with run:
        (folder / "notes.txt").write_text("hello")
    return run.run_id


def test_corrupt_manifest_deleted_folder_partial_metrics(lmforge_home, tmp_path):
    run_id = _fake_run(lmforge_home, tmp_path / "r1")
    c = TestClient(create_app(lmforge_home), raise_server_exceptions=False)
    (tmp_path / "r1" / "manifest.json").write_text('{"stage": "pretrain", "status": ')  # cut short
    r = c.get(f"/runs/{run_id}")
    assert r.status_code == 200 and any("is corrupt" in p for p in problems(r.text))
    assert_no_trace(r)
    # a metrics file being written: the last line has no newline yet
    metrics = tmp_path / "r1" / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\nnot json\n{"step": 3, "lo')
    m = c.get(f"/api/runs/{run_id}/metrics").json()
    assert [x["step"] for x in m["records"]] == [1, 2] and m["bad_lines"] == 1
    with open(metrics, "a") as f:
        f.write('ss": 2.0}\n')
    m2 = c.get(f"/api/runs/{run_id}/metrics", params={"offset": m["offset"]}).json()
    assert [x["step"] for x in m2["records"]] == [3]
    # the folder deleted while the page is open
    shutil.rmtree(tmp_path / "r1")
    for url in (f"/runs/{run_id}", f"/runs/{run_id}/file?path=notes.txt", f"/runs/{run_id}/data",
                f"/api/runs/{run_id}/metrics", f"/curves?run={run_id}", f"/runs/{run_id}/lineage"):
        r = c.get(url)
        assert r.status_code < 500, url
        assert_no_trace(r)
        if r.status_code >= 400:
            assert "no longer exists" in r.text, url
    assert "no longer exists" in c.get(f"/runs/{run_id}").text
    missing = c.get("/runs/nope")
    assert missing.status_code == 404 and "no run &#39;nope&#39;" in missing.text


def test_missing_and_corrupt_registry(tmp_path):
    c = TestClient(create_app(tmp_path / "empty"), raise_server_exceptions=False)
    r = c.get("/runs")
    assert r.status_code == 200 and any("No registry yet" in p for p in problems(r.text))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "registry.sqlite").write_bytes(b"this is not a database" * 100)
    c = TestClient(create_app(bad), raise_server_exceptions=False)
    for url in ("/runs", "/api/runs", "/eval", "/data"):
        r = c.get(url)
        assert r.status_code == 503, url
        assert "cannot be read" in r.text and "registry" in r.text
        assert_no_trace(r)


def test_eval_leaderboard_with_intervals_and_per_item_results(lmforge_home, tmp_path):
    from lmforge.artifacts import StageRun, write_json

    ids = []
    for name, score in (("small", 0.25), ("large", 0.75)):
        run = StageRun("eval", "1", tmp_path / f"eval-{name}", {"model": name})
        with run:
            write_json(run.dir / "results.json", {
                "model": str(tmp_path / name), "aggregate_centered": score - 0.25,
                "tasks": {"mc": {"metric": "acc_norm", "score": score, "ci": [score - 0.1, score + 0.1], "n": 4}}})
            items = [{"gold": i % 2, "acc": 1.0, "acc_norm": float(i < 4 * score)} for i in range(4)]
            (run.dir / "items").mkdir()
            (run.dir / "items" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items) + "{broken\n")
        ids.append(run.run_id)
    c = TestClient(create_app(lmforge_home), raise_server_exceptions=False)
    page = c.get("/eval").text
    assert page.index(ids[1]) < page.index(ids[0])  # best aggregate first
    assert "[0.65, 0.85]" in page and "[0.15, 0.35]" in page
    assert f"/runs/{ids[0]}/items/mc" in page
    items = c.get(f"/runs/{ids[0]}/items/mc").text
    assert len(re.findall(r"<tr><td class=\"n\">", items)) == 4 and "1 unreadable line(s) skipped" in items
    wrong = c.get(f"/runs/{ids[0]}/items/mc", params={"only": "wrong"}).text
    assert len(re.findall(r"<tr><td class=\"n\">", wrong)) == 3  # acc_norm (the task's metric) is 0 on three items
    assert c.get(f"/runs/{ids[0]}/items/..%2F..%2Fsecret").status_code in (403, 404)


def test_running_rows_whose_process_is_gone_are_interrupted():
    import socket
    import subprocess
    import sys
    import time

    from lmforge.dashboard.store import with_derived

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    base = {"status": "running", "started_at": time.time() - 10, "finished_at": None, "config": "{}", "metrics": None}
    assert with_derived(dict(base))["state"] == "running"  # an older registry without pid/host columns
    here = socket.gethostname()
    assert with_derived({**base, "pid": gone.pid, "host": here})["state"] == "interrupted"
    assert with_derived({**base, "pid": os.getpid(), "host": here})["state"] == "running"
    assert with_derived({**base, "pid": gone.pid, "host": "another-machine"})["state"] == "running"
    assert with_derived({**base, "heartbeat": time.time() - 3600})["state"] == "interrupted"
    assert with_derived({**base, "status": "interrupted"})["state"] == "interrupted"
