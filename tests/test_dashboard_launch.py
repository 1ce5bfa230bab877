"""Launch: forms generated from each stage's Config, jobs as subprocesses that survive a reload and a dashboard
restart, cancel, and interrupted jobs shown as such."""

import json
import re
import subprocess
import sys
import time

from fastapi.testclient import TestClient

from lmforge.artifacts import write_json
from lmforge.dashboard.app import create_app
from lmforge.dashboard.jobs import STAGES, form_fields
from lmforge.dashboard.store import process_alive

ORIGIN = {"Origin": "http://127.0.0.1:8765"}


def client(home):
    app = create_app(home)
    return TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False), app


def test_forms_have_the_cli_flags_of_each_stage(lmforge_home):
    c, _ = client(lmforge_home)
    for name in STAGES:
        page = c.get(f"/launch/{name}").text
        for f in form_fields(STAGES[name]):
            assert f'name="{f["name"]}"' in page, (name, f["name"])
    page = c.get("/launch/pretrain").text
    assert re.search(r"<option selected>cosine</option>\s*<option\s*>wsd</option>", page)
    # the form's fields are exactly the CLI's flags (plus --out; minus --config / --force)
    import typer

    from lmforge import cli

    group = typer.main.get_command(cli.app)
    _, command, _ = group.resolve_command(typer.Context(group), ["pretrain"])  # builds the lazy command
    flags = {p.name for p in command.params} - {"config_file", "force"}
    assert set(re.findall(r'id="f-(\w+)"', page)) == flags
    assert c.get("/launch/nope").status_code == 404


def test_invalid_values_are_a_message_naming_the_field(lmforge_home):
    c, app = client(lmforge_home)
    r = c.post("/api/jobs", json={"stage": "pretrain", "config": {"tokenizer": "x", "max_steps": "many"}},
               headers={**ORIGIN, "X-CSRF-Token": app.state.guard.csrf_token})
    assert r.status_code == 422 and "max_steps" in r.json()["error"]
    r = c.post("/api/jobs", json={"stage": "pretrain", "config": {"bogus": 1}},
               headers={**ORIGIN, "X-CSRF-Token": app.state.guard.csrf_token})
    assert r.status_code == 400 and "bogus" in r.json()["error"]


def test_launch_cancel_and_survive_a_restart(lmforge_home, tmp_path):
    c, app = client(lmforge_home)
    headers = {**ORIGIN, "X-CSRF-Token": app.state.guard.csrf_token}
    # a job that runs a while: a data run over many documents
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": str(i), "text": f"document {i} " * 80}) + "\n" for i in range(20000)))
    job = c.post("/api/jobs", json={"stage": "data", "config": {"inputs": [str(raw)], "langid": False}},
                 headers=headers).json()
    assert job["state"] == "running" and job["argv"][3:5] == ["data", "run"] and "--no-langid" in job["argv"]
    # a browser reload (a new request) and a dashboard restart (a new app) both still see it running
    assert c.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    c2, app2 = client(lmforge_home)
    assert c2.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    assert f'/jobs/{job["id"]}' in c2.get("/launch").text
    # the restarted dashboard can still cancel it (it is in its own process group)
    r = c2.post(f"/jobs/{job['id']}/cancel", data={"csrf": app2.state.guard.csrf_token}, headers=ORIGIN,
                follow_redirects=False)
    assert r.status_code == 303
    deadline = time.time() + 60
    while True:
        if not process_alive(job["pid"]):
            break
        assert time.time() < deadline, "cancel did not stop the job"
        time.sleep(0.2)
    assert c2.get(f"/api/jobs/{job['id']}").json()["state"] == "cancelled"
    assert c.post(f"/jobs/{job['id']}/cancel", data={"csrf": app.state.guard.csrf_token},
                  headers=ORIGIN).status_code == 409


def test_a_job_whose_process_died_unwatched_is_interrupted(lmforge_home, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for job_id, out_status in (("20260101-000000-aaaaaa", None), ("20260101-000001-bbbbbb", "done")):
        out = tmp_path / job_id
        if out_status:
            write_json(out / "manifest.json", {"status": out_status})
        write_json(lmforge_home / "dashboard-jobs" / job_id / "job.json",
                   {"id": job_id, "stage": "pretrain", "argv": ["lmforge", "pretrain"], "out": str(out),
                    "pid": gone.pid, "started_at": time.time(), "finished_at": None, "exit_code": None,
                    "cancelled": False})
        (lmforge_home / "dashboard-jobs" / job_id / "output.log").write_text("step 1\n")
    c, _ = client(lmforge_home)
    states = {j["id"]: j["state"] for j in c.get("/api/jobs").json()}
    assert states == {"20260101-000000-aaaaaa": "interrupted", "20260101-000001-bbbbbb": "done"}
    page = c.get("/jobs/20260101-000000-aaaaaa").text
    assert "interrupted" in page and "did not finish" in page
    with c.stream("GET", "/api/jobs/20260101-000000-aaaaaa/log/stream") as s:
        body = "".join(s.iter_text())
    assert "step 1" in body and "event: end" in body
    assert c.get("/jobs/..%2F..%2Fetc").status_code == 404
