"""Honest run states, with real processes: a killed run shows stale (not running forever), SIGTERM ends a run
`interrupted`, a resume links to the run it continues, and older registry files are migrated."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lmforge import registry
from lmforge.artifacts import read_manifest

ROOT = Path(__file__).resolve().parents[1]

# a stage that waits (inside its run) until the test lets it finish by creating the file `go`
CHILD = """
import sys, time, pathlib
from lmforge.stages import begin
out = pathlib.Path(sys.argv[1])
run = begin("toy", "1", out, {"k": 1})
with run:
    (out / "started").write_text("1")
    while not (out / "go").exists():
        time.sleep(0.02)
    (out / "result.txt").write_text("ok")
"""


def env(home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)


def start(out: Path, home: Path, **extra: str) -> subprocess.Popen:
    (out / "started").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], env=env(home, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "started").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    return proc


def runs_output(home: Path, columns: int = 200) -> str:
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "runs"], cwd=ROOT, capture_output=True, text=True,
                          env=env(home, COLUMNS=str(columns)), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def row_of(output: str, run_id: str) -> str:
    lines = [line for line in output.splitlines() if line.strip("│┃ ").startswith(run_id)]
    assert lines, f"{run_id} not in\n{output}"
    return lines[0]


def test_killed_interrupted_and_resumed_runs(tmp_path, lmforge_home):
    out = tmp_path / "toy"
    out.mkdir()

    # 1. running while its process lives
    first = start(out, lmforge_home)
    id1 = read_manifest(out).run_id
    assert read_manifest(out).pid == first.pid
    assert "running" in row_of(runs_output(lmforge_home), id1)

    # a second process may not write into the folder while the first one runs there
    busy = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env(lmforge_home), capture_output=True,
                          text=True, timeout=60)
    assert busy.returncode != 0 and f"is being written by run {id1}" in busy.stderr
    assert read_manifest(out).run_id == id1

    # 2. SIGKILL: nothing can record it; `runs` sees the process is gone
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert read_manifest(out).status == "running"  # what the folder says; the registry view corrects it
    row = row_of(runs_output(lmforge_home), id1)
    assert f"stale (pid {first.pid} gone)" in row and "running" not in row.replace("stale", "")

    # 3. a second run resumes the killed one; SIGTERM ends it `interrupted`, in the manifest and the registry
    second = start(out, lmforge_home)
    id2 = read_manifest(out).run_id
    assert read_manifest(out).resumes == id1
    second.send_signal(signal.SIGTERM)
    second.wait(timeout=30)
    assert second.returncode != 0
    m = read_manifest(out)
    assert m.run_id == id2 and m.status == "interrupted" and "SIGTERM" in m.error
    rows = {r["run_id"]: r for r in registry.list_runs()}
    assert rows[id2]["status"] == "interrupted" and rows[id2]["resumes"] == id1
    assert rows[id1]["resumed_by"] == id2

    # 4. the third run resumes the interrupted one and finishes
    (out / "go").write_text("1")
    third = start(out, lmforge_home)
    assert third.wait(timeout=60) == 0
    m = read_manifest(out)
    assert m.status == "done" and m.resumes == id2
    id3 = m.run_id
    listing = runs_output(lmforge_home)
    assert "done" in row_of(listing, id3) and f"resumes {id2}" in row_of(listing, id3)
    assert "interrupted stopped by SIGTERM" in row_of(listing, id2) and f"resumes {id1}" in row_of(listing, id2)
    assert "stale (pid" in row_of(listing, id1) and f"resumed by {id2}" in row_of(listing, id1)
    narrow = runs_output(lmforge_home, columns=80)  # ids whole (copyable), nothing wider than the terminal
    assert all(len(line) <= 80 for line in narrow.splitlines() if line[:1] in "┏┃┡│└")
    for run_id, state in ((id1, "stale (pid"), (id2, "interrupted"), (id3, "done")):
        assert state in row_of(narrow, run_id)
    lineage = subprocess.run([sys.executable, "-m", "lmforge.cli", "lineage", str(out), "--json"], cwd=ROOT,
                             capture_output=True, text=True, env=env(lmforge_home), timeout=60)
    tree = json.loads(lineage.stdout)
    assert tree["run_id"] == id3 and tree["resumes"] == id2 and tree["status"] == "done"
    text = subprocess.run([sys.executable, "-m", "lmforge.cli", "lineage", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env=env(lmforge_home, COLUMNS="200"), timeout=60)
    assert f"resumes run {id2}" in text.stderr


def test_heartbeat_is_refreshed_and_a_silent_live_pid_is_not_running(tmp_path, lmforge_home):
    out = tmp_path / "toy"
    out.mkdir()
    proc = start(out, lmforge_home, LMFORGE_HEARTBEAT_S="0.1")
    try:
        first = read_manifest(out).heartbeat_at
        deadline = time.time() + 30
        while read_manifest(out).heartbeat_at == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)
        row = registry.list_runs()[0]
        assert row["heartbeat_at"] > first and row["state"] == "running"
    finally:
        (out / "go").write_text("1")
        proc.wait(timeout=60)
    assert read_manifest(out).status == "done"
    # a row whose pid lives (this process: a reused pid, or a hung one) but whose heartbeat stopped
    stale = dict(registry.list_runs()[0], status="running", pid=os.getpid(), heartbeat_at=time.time() - 3600)
    assert registry.state(stale).startswith(f"stale (pid {os.getpid()} alive, no heartbeat for")
    elsewhere = dict(stale, host="another-machine")
    assert registry.state(elsewhere).startswith("stale (no heartbeat from another-machine")
    assert registry.state(dict(elsewhere, heartbeat_at=time.time())) == "running on another-machine"


OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, stage TEXT NOT NULL, path TEXT NOT NULL, fingerprint TEXT NOT NULL,
    status TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, config TEXT NOT NULL, metrics TEXT, error TEXT);
CREATE TABLE edges (src TEXT NOT NULL, dst_run TEXT NOT NULL, role TEXT NOT NULL, src_fingerprint TEXT NOT NULL,
    PRIMARY KEY (src, dst_run, role));
"""


def test_a_registry_from_an_older_lmforge_is_migrated(tmp_path, lmforge_home):
    lmforge_home.mkdir(parents=True)
    con = sqlite3.connect(lmforge_home / "registry.sqlite")
    con.executescript(OLD_SCHEMA)
    con.execute("INSERT INTO runs VALUES ('old1', 'data', '/x', 'f', 'running', 1.0, NULL, '{}', NULL, NULL)")
    con.execute("INSERT INTO runs VALUES ('old2', 'data', '/y', 'f', 'done', 1.0, 2.0, '{}', '{}', NULL)")
    con.commit()
    con.close()
    listing = runs_output(lmforge_home)
    assert "stale (no pid recorded)" in row_of(listing, "old1") and "done" in row_of(listing, "old2")
    with sqlite3.connect(lmforge_home / "registry.sqlite") as con:
        cols = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    assert {"pid", "host", "heartbeat_at", "resumes"} <= cols
