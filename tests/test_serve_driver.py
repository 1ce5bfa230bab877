"""Who runs the engine's steps: a ``generate`` caller drives the engine itself, other threads' requests start a
background worker that gives the role back when idle, ``embed`` runs on the driver, ``run_forever`` drives from the
calling thread, and ``lmforge serve`` (engine on its main thread, HTTP on another) answers the ``openai`` client and
stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture()
def engine(tiny_model_dir):
    eng = Engine.from_folder(tiny_model_dir, max_num_seqs=4, max_model_len=128)
    eng.worker_idle_s = 0.05
    yield eng
    eng.shutdown()


def _record_step_threads(engine: Engine) -> list[threading.Thread]:
    seen: list[threading.Thread] = []
    step = engine.step

    def recording_step() -> int:
        seen.append(threading.current_thread())
        return step()

    engine.step = recording_step
    return seen


def test_generate_caller_drives_the_engine_itself(engine):
    seen = _record_step_threads(engine)
    text = engine.generate_text("The with statement", GREEDY).text
    assert seen and set(seen) == {threading.current_thread()}
    assert engine._worker is None and engine._driver is None
    # a request from another thread (a sink, not generate) starts a worker, which hands the role back when idle
    done = threading.Event()
    outs = []

    def sink(out):
        outs.append(out)
        if out.finished:
            done.set()

    threading.Thread(target=engine.add_request, args=("The with statement", GREEDY, sink)).start()
    assert done.wait(30)
    assert "".join(o.text for o in outs) == text
    assert any(t.name == "lmforge-engine" for t in seen)
    deadline = time.monotonic() + 10
    while engine._driver is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine._driver is None and engine._worker is None
    assert engine.generate_text("The with statement", GREEDY).text == text  # and a caller drives again


def test_concurrent_callers_share_one_driver_and_agree(engine):
    prompts = ["The with statement", "A class definition", "The import system", "Exceptions"]
    alone = [engine.generate_text(p, GREEDY).text for p in prompts]
    results: dict[int, str] = {}

    def client(i: int) -> None:
        results[i] = engine.generate_text(prompts[i % 4], GREEDY).text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(12)] == alone * 3
    assert not engine.has_work()


def test_run_forever_drives_embed_and_requests_from_its_thread(engine):
    expected = engine.generate_text("The import system", GREEDY).text
    vec = engine.embed("The import system")
    seen = _record_step_threads(engine)
    embed_threads: list[threading.Thread] = []
    embed_ids = engine._embed_ids

    def recording_embed(ids):
        embed_threads.append(threading.current_thread())
        return embed_ids(ids)

    engine._embed_ids = recording_embed
    stop = threading.Event()
    driver = threading.Thread(target=engine.run_forever, kwargs={"stop": stop.is_set}, name="server-main")
    driver.start()
    deadline = time.monotonic() + 10
    while engine._driver is not driver and time.monotonic() < deadline:
        time.sleep(0.01)
    got: dict[str, object] = {}

    def client() -> None:  # a request thread, as the HTTP server's
        got["text"] = engine.generate_text("The import system", GREEDY).text
        got["vec"] = engine.embed("The import system")

    t = threading.Thread(target=client)
    t.start()
    t.join(60)
    stop.set()
    driver.join(10)
    assert not driver.is_alive()
    assert got["text"] == expected
    torch.testing.assert_close(got["vec"], vec)
    assert set(seen) == {driver} and embed_threads == [driver]
    assert engine._driver is None


def test_shutdown_stops_run_forever_and_engine_serves_again(engine):
    driver = threading.Thread(target=engine.run_forever)
    driver.start()
    while engine._driver is not driver:
        time.sleep(0.01)
    engine.shutdown()
    driver.join(10)
    assert not driver.is_alive()
    assert engine.generate_text("Exceptions", GREEDY).finish_reason in ("stop", "length")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lmforge_serve_process_answers_openai_client_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    from openai import OpenAI

    port = _free_port()
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(tiny_model_dir), "--port", str(port),
                             "--max-model-len", "128"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = client.models.list()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
        assert models.data[0].id == tiny_model_dir.name
        res = client.completions.create(model=models.data[0].id, prompt="The with statement", max_tokens=8,
                                        temperature=0)
        assert res.usage.completion_tokens >= 1
        emb = client.embeddings.create(model=models.data[0].id, input="The with statement")
        assert len(emb.data[0].embedding) == 64
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
