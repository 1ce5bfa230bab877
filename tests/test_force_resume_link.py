"""`lmforge sft/dpo/synth ... --force` in a folder whose run was cut short continues that run (these stages keep their
checkpoints or finished tasks): the registry and the manifest must say which run it resumes, as without --force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge import registry
from lmforge.artifacts import MANIFEST, read_manifest, write_json

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"
CHAT = ROOT / "data" / "chat" / "chatterbot_en.jsonl"


class _Grader(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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


@pytest.fixture
def grader():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Grader)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _args(stage: str, model: Path, data: Path, base_url: str) -> list[str]:
    if stage == "synth":
        return ["synth", "--base-url", base_url, "--model", "m", "--mode", "grade", "--data", str(data)]
    common = ["--model", str(model), "--full", "--seq-len", "256", "--max-steps", "2", "--warmup-steps", "0",
              "--batch-size", "2", "--threads", "1"]
    return [stage, *common, "--data", str(PREFS if stage == "dpo" else data)]


@pytest.mark.parametrize("stage", ["sft", "dpo", "synth"])
def test_forced_rerun_of_an_unfinished_folder_records_what_it_resumes(stage, tiny_model_dir, tmp_path, lmforge_home,
                                                                      grader):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(l + "\n" for l in CHAT.read_text().splitlines()[:12]))
    out = tmp_path / stage
    env = dict(os.environ, LMFORGE_HOME=str(lmforge_home), HF_HUB_OFFLINE="1", OPENAI_API_KEY="x",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "lmforge.cli", *_args(stage, tiny_model_dir, data, grader), "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    # the run is cut short (as by a kill): an unfinished manifest of the same fingerprint stays in the folder
    m = read_manifest(out)
    write_json(out / MANIFEST, {**m.model_dump(), "status": "interrupted"})

    again = subprocess.run(cmd + ["--force"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    m2 = read_manifest(out)
    assert m2.status == "done" and m2.run_id != m.run_id
    assert m2.resumes == m.run_id
    rows = {r["run_id"]: r for r in registry.list_runs()}
    assert rows[m2.run_id]["resumes"] == m.run_id
