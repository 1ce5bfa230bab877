"""Ctrl-C during `lmforge synth` (a thread pool of HTTP requests) stops sending requests, says what was done and exits
130; the re-run resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lmforge.artifacts import read_manifest
from ctrl_c import default_sigint

ROOT = Path(__file__).resolve().parents[1]
TASKS = 40


class _SlowGrader(BaseHTTPRequestHandler):
    calls = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).calls += 1
        time.sleep(0.2)
        text = json.dumps({"score": 5, "reason": "fine"})
        data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_ctrl_c_during_synth_stops_sending_requests(tmp_path, lmforge_home):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowGrader)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        data = tmp_path / "chat.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                         {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                                for i in range(TASKS)))
        out = tmp_path / "graded"
        cmd = [sys.executable, "-m", "lmforge.cli", "synth", "--base-url",
               f"http://127.0.0.1:{server.server_address[1]}/v1", "--model", "m", "--mode", "grade",
               "--data", str(data), "--concurrency", "2", "--out", str(out)]
        env = dict(os.environ, LMFORGE_HOME=str(lmforge_home), HF_HUB_OFFLINE="1", OPENAI_API_KEY="x")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
        deadline = time.time() + 120
        kept = out / "synth.jsonl"
        while not (kept.exists() and len(kept.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-3000:]
        found = re.search(rf"interrupted: (\d+) of {TASKS} tasks done; re-run to resume", err)
        assert found, err[-3000:]
        assert int(found.group(1)) < TASKS
        calls = _SlowGrader.calls
        assert calls < TASKS
        time.sleep(0.5)
        assert _SlowGrader.calls == calls  # nothing is sent after the process left
        assert read_manifest(out).status == "interrupted"

        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert read_manifest(out).status == "done" and len(kept.read_text().splitlines()) == TASKS
    finally:
        server.shutdown()
