"""``lmforge serve`` and ``lmforge chat`` as a user runs them (subprocesses): start failures exit non-zero with one
line, the dtype is shown at start and in ``/v1/models``, SIGTERM ends cut-short streams with ``finish_reason="abort"``
and exit 0, and ``lmforge chat --prompt`` / piped stdin give the server's answer for the same sampling settings."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest
from openai import OpenAI
from test_serve import _build_serve_model

NAME = "tiny-long"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / NAME
    _build_serve_model(folder, ctx=4096)  # a long context: a stream that is still running when SIGTERM comes
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_serve_start_failures_exit_nonzero_with_one_line(model_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(_cli("serve", str(model_dir), "--port", str(port)), capture_output=True, text=True,
                              env=_env(), timeout=120)
    assert f"127.0.0.1:{port}" in _one_error_line(proc) and "in use" in proc.stderr

    proc = subprocess.run(_cli("serve", str(tmp_path / "missing")), capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert "does not exist" in _one_error_line(proc)

    proc = subprocess.run(_cli("chat", str(tmp_path / "missing"), "--prompt", "hi"), capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert "does not exist" in _one_error_line(proc)

    proc = subprocess.run(_cli("serve", str(model_dir), "--host", "no-such-host.invalid", "--port", "8000"),
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert "no-such-host.invalid" in _one_error_line(proc)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in model_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = subprocess.run(_cli("serve", str(corrupt), "--port", str(_free_port())), capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert "model.safetensors" in _one_error_line(proc) or "corrupt" in proc.stderr


@pytest.fixture(scope="module")
def served(model_dir):
    """``lmforge serve MODEL`` with default flags; yields (process, base_url, first stdout line)."""
    port = _free_port()
    proc = subprocess.Popen(_cli("serve", str(model_dir), "--port", str(port), "--max-num-seqs", "4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    try:
        banner = lines.get(timeout=120)
        yield proc, f"http://127.0.0.1:{port}/v1", banner
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_serve_shows_dtype_default_float32(served):
    proc, url, banner = served
    assert "dtype float32" in banner and url.removesuffix("/v1") in banner
    card = OpenAI(base_url=url, api_key="x", max_retries=0).models.list().data[0]
    assert card.id == NAME and card.model_extra["dtype"] == "float32" and card.model_extra["quantize"] is None


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_p=1.0, seed=7)])
def test_chat_cli_answers_as_the_server_does(served, model_dir, settings):
    _, url, _ = served
    message = "Explain the for statement"
    answer = OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": message}], max_tokens=12, **settings)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    one = subprocess.run(_cli("chat", str(model_dir), "--prompt", message, "--max-tokens", "12", *flags),
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert one.returncode == 0, one.stderr
    assert one.stdout == answer.choices[0].message.content + "\n"  # the answer only: scriptable
    piped = subprocess.run(_cli("chat", str(model_dir), "--max-tokens", "12", *flags), input=message + "\n",
                           capture_output=True, text=True, env=_env(), timeout=120)
    assert piped.returncode == 0 and piped.stdout == one.stdout


def test_sigterm_ends_streams_with_abort_and_exits_0(served):
    proc, url, _ = served
    client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    stream = client.completions.create(model=NAME, prompt="The for statement", max_tokens=2000, temperature=1.0,
                                       seed=1, stream=True, logit_bias={"0": -100})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            proc.send_signal(signal.SIGTERM)
    assert chunks[-1].choices[0].finish_reason == "abort"  # not a natural end: the client can tell
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert sum(len(c.choices[0].text) for c in chunks) > 0
    assert proc.wait(60) == 0
