"""The dashboard as a user sees it: a real `lmforge dashboard` process driven by headless Chromium (Playwright over
Debian's /usr/bin/chromium).  Opens every page, filters runs, follows a lineage link, and watches a training curve
grow while a tiny `lmforge pretrain` runs."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dashboard_fixtures import shared_workspace

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y "
                                                          "chromium; `make install` does it where apt-get exists)")
sync_api = pytest.importorskip("playwright.sync_api", reason="PyPI playwright is not installed (the test extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", LMFORGE_HOME=str(home))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    shared = shared_workspace(tmp_path_factory)
    home = tmp_path_factory.mktemp("browser-home")
    src = sqlite3.connect(shared["home"] / "registry.sqlite")
    dst = sqlite3.connect(home / "registry.sqlite")
    src.backup(dst)  # a copy this module may add runs to
    src.close()
    dst.close()
    return {**shared, "home": home}


@pytest.fixture(scope="module")
def server(ws):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "dashboard", "--port", str(port)], env=_env(ws["home"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(url + "/api/runs", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("dashboard did not start: " + (proc.stdout.read() if proc.stdout else ""))
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()


def _ids(server) -> dict[str, str]:
    """The workspace's runs by stage (the oldest of each stage: runs the tests launch come later)."""
    return {r["stage"]: r["run_id"] for r in httpx.get(server + "/api/runs").json()}  # newest first: oldest wins


def test_every_page_opens_without_errors(server, page):
    ids = _ids(server)
    for path, heading in [("/runs", "Runs"), (f"/runs/{ids['pretrain']}", "pretrain"), ("/curves", "Training curves"),
                          (f"/curves?run={ids['pretrain']}", "Training curves"), ("/lineage", "Lineage"),
                          (f"/runs/{ids['pretrain']}/lineage", "Lineage of"), ("/data", "Data runs"),
                          (f"/runs/{ids['data']}/data", "Data run"), ("/eval", "Evaluation"),
                          (f"/runs/{ids['tokenizer']}/file?path=manifest.json", "manifest.json")]:
        resp = page.goto(server + path)
        assert resp.status == 200, path
        assert heading in page.inner_text("h1"), path
        assert "Traceback" not in page.content()
    # the finished run's curves are drawn from all its logged steps
    page.goto(f"{server}/curves?run={ids['pretrain']}")
    page.wait_for_function(f"window.lmforgeCurves && window.lmforgeCurves.points('{ids['pretrain']}') == 8")
    assert page.inner_text(f'#legend li[data-run="{ids["pretrain"]}"] [data-role="points"]') == "8"
    assert page.errors == []


def test_filter_runs_and_search(server, page):
    page.goto(server + "/runs")
    assert page.locator("table.runs tbody tr").count() >= 3
    page.select_option("select[name=stage]", "data")
    page.wait_for_url("**/runs?stage=data**")
    rows = page.locator("table.runs tbody tr")
    assert rows.count() == 1 and rows.first.get_attribute("data-stage") == "data"
    page.select_option("select[name=stage]", "")
    page.wait_for_url("**stage=&**")
    page.fill("input[name=q]", "runs/model")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**q=runs%2Fmodel**")
    assert [page.locator("table.runs tbody tr").nth(i).get_attribute("data-stage")
            for i in range(page.locator("table.runs tbody tr").count())] == ["pretrain"]


def test_follow_a_lineage_link(server, page):
    ids = _ids(server)
    page.goto(f"{server}/runs/{ids['pretrain']}")
    page.click("text=Lineage graph")
    page.wait_for_url(f"**/runs/{ids['pretrain']}/lineage")
    assert page.locator("svg#lineage g.node").count() == 4  # raw file → data → tokenizer → model
    page.hover(f'g.node[data-key="run:{ids["tokenizer"]}"]')
    assert page.locator("svg#lineage g.edge.hl").count() == 2  # data → tokenizer → pretrain
    page.click(f'g.node[data-key="run:{ids["data"]}"]')
    page.wait_for_url(f"**/runs/{ids['data']}")
    assert "data" in page.inner_text("h1")
    assert page.errors == []


def test_a_live_curve_grows_while_a_tiny_pretrain_runs(server, page, ws, tmp_path):
    out = tmp_path / "live"
    flags = ["--tokenizer", str(ws["tok"]), "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
             "--num-kv-heads", "1", "--seq-len", "32", "--batch-size", "4", "--max-steps", "50", "--warmup-steps",
             "2", "--eval-every", "20", "--eval-windows", "2", "--checkpoint-every", "100", "--no-tensorboard",
             "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "pretrain", *flags], env=_env(ws["home"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # hold the run (SIGSTOP) as soon as its first step is logged, so the page opens on a run still in progress
        # however fast the machine trains; it goes on (SIGCONT) once the page shows it live, well inside the
        # heartbeat's grace
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the pretrain run logged no step"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGSTOP)  # the run and any process it started
        running = httpx.get(server + "/api/runs", params={"stage": "pretrain", "status": "running"}).json()
        run_id = next(r["run_id"] for r in running if r["path"] == str(out.resolve()))  # listed as running
        page.goto(f"{server}/curves?run={run_id}")
        legend = f'#legend li[data-run="{run_id}"]'
        page.wait_for_function(f"window.lmforgeCurves.points('{run_id}') >= 1", timeout=240_000)
        first = page.evaluate(f"window.lmforgeCurves.points('{run_id}')")
        assert first < 50, "the run finished before the page could watch it"
        assert page.inner_text(legend + ' [data-role="live"]') == "● live"
        os.killpg(proc.pid, signal.SIGCONT)
        page.wait_for_function(f"window.lmforgeCurves.points('{run_id}') > {first}", timeout=240_000)
        assert proc.wait(timeout=600) == 0, proc.stdout.read()
        page.wait_for_function(f"document.querySelector('{legend} [data-role=\"state\"]').textContent == 'done'",
                               timeout=60_000)
        steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        got = page.evaluate(f"window.lmforgeCurves.data['{run_id}'].map(r => r.step)")
        assert got == steps == list(range(1, 51))  # every step once: nothing lost or doubled between fetch and stream
        assert page.inner_text(legend + ' [data-role="live"]') == ""
        # two runs overlaid, and smoothing (an exponential moving average) applied to what is drawn
        first_run = _ids(server)["pretrain"]
        page.goto(f"{server}/curves?run={first_run}&run={run_id}")
        page.wait_for_function(f"window.lmforgeCurves.points('{first_run}') == 8 && "
                               f"window.lmforgeCurves.points('{run_id}') == 50")
        assert page.locator("#legend li").count() == 2
        assert page.evaluate("lmforgePlot.ema([[1, 1], [2, 3], [3, 3]], 0.5)") == [[1, 1], [2, 2], [3, 2.5]]
        page.fill("#smooth", "0.9")
        page.dispatch_event("#smooth", "input")
        assert page.inner_text("#smooth-v") == "0.9"
        assert page.errors == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)


def test_launch_a_stage_from_its_form_and_watch_its_log(server, page, ws, tmp_path):
    out = tmp_path / "tok-from-dashboard"
    page.goto(server + "/launch/tokenizer")
    page.fill("#f-data", str(ws["data"]))
    page.fill("#f-vocab_size", "300")
    page.fill("#f-out", str(out))
    page.click("#launch-form button[type=submit]")
    page.wait_for_url("**/jobs/*")
    assert "--vocab-size 300" in page.inner_text("pre.command")
    page.wait_for_function("document.getElementById('job-state').textContent == 'done'", timeout=300_000)
    assert "bytes/token" in page.inner_text("#log")
    page.reload()  # the job outlives the page
    assert page.inner_text("#job-state") == "done"
    page.wait_for_function("document.getElementById('log').textContent.includes('bytes/token')")
    page.click("#job-run")
    assert "tokenizer" in page.inner_text("h1")
    assert json.loads((out / "manifest.json").read_text())["config"]["vocab_size"] == 300
    page.goto(server + "/launch")
    assert page.locator("#jobs tr[data-job] .state.done").count() >= 1
    assert page.errors == []


def test_chat_in_the_playground(server, page, tmp_path_factory):
    from test_serve import _build_serve_model

    from lmforge.serve.engine import Engine
    from lmforge.serve.smoke import running_server

    folder = tmp_path_factory.mktemp("pg") / "tiny-chat"
    _build_serve_model(folder)
    engine = Engine.from_folder(folder, max_num_seqs=2, max_model_len=None)
    try:
        with running_server(engine, "tiny-chat") as url:
            page.goto(f"{server}/playground?base_url={url}")
            page.wait_for_function("document.getElementById('model').options.length == 1")
            page.fill("#max-tokens", "10")
            page.fill("#prompt", "What is a tuple?")
            page.click("#send-btn")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
            assert page.inner_text(".msg.user .content") == "What is a tuple?"
            assert page.inner_text(".msg.assistant .content").strip()
            # the same prompt to two models side by side (here the same one, greedy: the same answer twice)
            page.fill("#temperature", "0")
            page.check("#compare")
            page.fill("#prompt", "What is a dict?")
            page.click("#send-btn")
            page.wait_for_function("document.querySelectorAll('.answers:last-child .msg[data-done=\"1\"]').length == 2",
                                   timeout=120_000)
            a, b = (page.inner_text(f".answers:last-child .msg[data-side='{s}'] .content") for s in "ab")
            assert a == b and len(a) > 0  # a random tiny model: greedy text may be whitespace
            page.goto(f"{server}/serving?url={url[:-3]}")
            page.wait_for_function("document.getElementById('server').innerText.includes('generated tokens')")
        # the server is gone now: the playground says so in the page
        page.goto(f"{server}/playground?base_url={url}")
        page.wait_for_selector("#problem:not([hidden])")
        assert "cannot list models" in page.inner_text("#problem")
        assert [e for e in page.errors if "502" not in e] == []  # the failed fetch itself is logged by Chromium
    finally:
        engine.shutdown()


def test_label_three_items_with_the_keyboard_and_export(server, page, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?",
                                         "answers": [f"It is {2 * i}.", f"Maybe {i}."]}) + "\n" for i in range(3)))
    page.goto(server + "/label")
    page.fill("#new-project input[name=name]", "arith")
    page.fill("#new-project input[name=items]", str(items))
    page.fill("#new-project input[name=annotators]", "alice")
    page.click("#new-project button[type=submit]")
    page.wait_for_url("**/label/arith")
    page.click("text=label as alice")
    for i in range(3):
        page.wait_for_function(f"document.getElementById('progress').textContent == '{i} / 3'")
        assert page.inner_text("#prompt-text") == f"What is {i} + {i}?"
        page.keyboard.press("5")  # rate 5
        page.keyboard.press("a")  # answer a is better
        page.keyboard.press("e")  # edit the gold answer
        page.keyboard.press("Control+a")
        page.keyboard.type(f"{i} + {i} = {2 * i}.")
        page.keyboard.press("Control+Enter")
    page.wait_for_selector("#finished")
    page.goto(server + "/label/arith")
    assert "3 / 3" in page.inner_text("#progress")
    with page.expect_download() as dl:
        page.click("#export-sft")
    sft = [json.loads(l) for l in Path(dl.value.path()).read_text().splitlines()]
    assert [s["messages"][1]["content"] for s in sft] == [f"{i} + {i} = {2 * i}." for i in range(3)]
    with page.expect_download() as dl:
        page.click("#export-pref")
    pref = [json.loads(l) for l in Path(dl.value.path()).read_text().splitlines()]
    assert [(p["chosen"], p["meta"]["annotator"]) for p in pref] == [(f"It is {2 * i}.", "alice") for i in range(3)]
    assert page.errors == []
