"""The feedback loop as a user runs it: ``lmforge serve MODEL --record`` → chat through the official ``openai`` client
→ thumbs and corrections through ``POST /v1/feedback`` → ``lmforge feedback export`` (dpo and sft) → ``lmforge dpo``
trains on the pairs → ``lmforge eval`` the DPO model; ``lmforge lineage`` of the eval leads
through the DPO model and the export to the serve run that gave the answers and the model it served."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is a list?", "How do I open a file?", "What does len do?", "Explain the for statement",
             "What is a tuple?", "How do I sort a dict?"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *args]


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cli(*args), capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_collect_feedback(model: Path) -> tuple[list[str], dict]:
    """Serve with --record, ask, give feedback, stop; the response ids and the corrections given."""
    port = _free_port()
    proc = subprocess.Popen(_cli("serve", str(model), "--port", str(port), "--record", "--max-num-seqs", "4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        banner = [lines.get(timeout=180), lines.get(timeout=60)]
        assert any("recording answers to" in b for b in banner), banner
        url = f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        ids, corrections = [], {}
        for i, q in enumerate(QUESTIONS):
            answer = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": q}],
                                                    n=2, max_tokens=8, temperature=1.0, seed=i)
            ids.append(answer.id)
            texts = [c.message.content for c in answer.choices]
            feedback = [{"choice": 0, "rating": "up", "annotator": "ann"}]
            if texts[1] != texts[0]:
                feedback.append({"choice": 1, "rating": "down", "annotator": "ann"})
            if i % 2 == 0:  # a correction of the down-rated answer: the preferred answer of a pair
                corrections[answer.id] = f"Answer {i}: see the Python tutorial."
                feedback.append({"choice": 1, "rating": "down", "annotator": "bob",
                                 "correction": corrections[answer.id]})
            for fb in feedback:
                resp = httpx.post(url + "/v1/feedback", json={"response_id": answer.id, **fb}, timeout=30)
                assert resp.status_code == 200, resp.text
        bad = httpx.post(url + "/v1/feedback", json={"response_id": ids[0], "rating": "5 stars"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return ids, corrections


def _find(tree: dict, stage: str) -> dict | None:
    if tree.get("stage") == stage:
        return tree
    for sub in tree.get("inputs", {}).values():
        if (hit := _find(sub, stage)) is not None:
            return hit
    return None


def test_serve_feedback_export_dpo_eval_lineage(tiny_model_dir, tmp_path, lmforge_home):
    ids, corrections = _serve_and_collect_feedback(tiny_model_dir)

    # the serve run is in the registry, done, with what it recorded
    serve_dirs = list((lmforge_home / "serve").iterdir())
    assert len(serve_dirs) == 1 and (serve_dirs[0] / "recording.json").is_file()
    manifest = json.loads((serve_dirs[0] / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["responses"] == len(QUESTIONS)
    assert manifest["metrics"]["feedback"] >= len(QUESTIONS) + len(corrections)

    _run("feedback", "export", "--format", "dpo", "--out", str(tmp_path / "fb-dpo"))
    _run("feedback", "export", "--format", "sft", "--out", str(tmp_path / "fb-sft"))
    pairs = [json.loads(l) for l in (tmp_path / "fb-dpo" / "dpo.jsonl").read_text().splitlines()]
    chosen = {p["chosen"] for p in pairs}
    assert set(corrections.values()) <= chosen  # every correction became a preferred answer
    assert {p["meta"]["response_id"] for p in pairs if p["meta"]["pair"] == "correction"} == set(corrections)
    sft = [json.loads(l) for l in (tmp_path / "fb-sft" / "sft.jsonl").read_text().splitlines()]
    assert {r["meta"]["response_id"] for r in sft} == set(ids)  # every answer has an up vote or a correction

    from lmforge.align.chat_data import record_to_messages  # how `lmforge sft` reads each record

    assert all(record_to_messages(r, "sft")[-1]["role"] == "assistant" for r in sft)
    dpo_out = tmp_path / "dpo"
    _run("dpo", "--model", str(tiny_model_dir), "--data", str(tmp_path / "fb-dpo" / "dpo.jsonl"), "--out",
         str(dpo_out), "--full", "--max-steps", "3", "--batch-size", "2", "--seq-len", "128", "--val-fraction", "0.25",
         "--eval-every", "3", "--checkpoint-every", "3", "--threads", "1")
    assert json.loads((dpo_out / "manifest.json").read_text())["metrics"]["train_pairs"] >= 3
    eval_out = tmp_path / "eval"
    _run("eval", "--model", str(dpo_out), "--tasks", str(ROOT / "tasks" / "chat"), "--task-limit", "3",
         "--task-max-len", "200", "--out", str(eval_out), "--prompts", "Hello", "--max-new-tokens", "4")
    assert json.loads((eval_out / "manifest.json").read_text())["status"] == "done"

    tree = json.loads(_run("lineage", str(eval_out), "--json").stdout)
    dpo_node = _find(tree, "dpo")
    export_node = _find(dpo_node, "feedback_export")
    serve_node = _find(export_node, "serve")
    assert dpo_node and export_node and serve_node, json.dumps(tree)[:2000]
    assert serve_node["run_id"] == manifest["run_id"] and Path(serve_node["path"]) == serve_dirs[0].resolve()
    served_model = serve_node["inputs"]["model"]  # the tiny folder: a raw input with its content fingerprint
    recorded = {p["meta"]["model"] for p in pairs if "model" in p["meta"]}
    assert served_model["path"] == str(tiny_model_dir.resolve()) and recorded == {served_model["fingerprint"]}

    # the dashboard draws the same chain: the DPO model's lineage graph holds the serve run and the export
    from fastapi.testclient import TestClient

    from lmforge.dashboard.app import create_app

    dash = TestClient(create_app(lmforge_home))
    graph = dash.get(f"/api/runs/{dpo_node['run_id']}/lineage").json()
    keys = {n["key"] for n in graph["nodes"]}
    assert {f"run:{serve_node['run_id']}", f"run:{export_node['run_id']}"} <= keys, keys
    # and forward: the export's page lists the DPO run that read a file inside its folder
    assert f'href="/runs/{dpo_node["run_id"]}"' in dash.get(f"/runs/{export_node['run_id']}").text
