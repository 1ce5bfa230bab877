"""Ctrl-C stops a stage with workers for real: pending shards are cancelled, workers stopped, the run says what was
done, exits 130 and is recorded `interrupted`; the re-run resumes it (and says so in the registry)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge import registry
from lmforge.artifacts import read_manifest
from ctrl_c import default_sigint

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 8


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def markers(out: Path) -> int:
    return len(list((out / ".done").glob("part-*"))) if (out / ".done").is_dir() else 0


def test_ctrl_c_during_data_run_with_workers(tmp_path, lmforge_home):
    src = tmp_path / "in"
    src.mkdir()
    for book in sorted((ROOT / "data/demo/books").glob("*.txt")):  # 16 files, 2 per shard
        for copy in range(2):
            (src / f"{book.stem}-{copy}.txt").write_text(book.read_text())
    out = tmp_path / "data"
    env = dict(os.environ, LMFORGE_HOME=str(lmforge_home), HF_HUB_OFFLINE="1", COLUMNS="200")
    cmd = [sys.executable, "-m", "lmforge.cli", "data", "run", "--inputs", str(src), "--out", str(out),
           "--shards", str(SHARDS), "--workers", "2", "--minhash", "--txt-chunk-chars", "2000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 180
    workers: set[int] = set()
    while markers(out) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no shard finished in time"
        workers.update(children(proc.pid))
        time.sleep(0.01)
    workers.update(children(proc.pid))
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the parent
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    found = re.search(r"interrupted: (\d+) of 8 shards done; re-run to resume", err)
    assert found, err[-3000:]
    done = int(found.group(1))
    assert 0 < done < SHARDS and done == markers(out)
    time.sleep(1.0)
    assert markers(out) == done  # no pending shard kept running after the parent left
    assert workers and not any(alive(p) for p in workers)  # the workers were stopped, not orphaned
    m = read_manifest(out)
    assert m.status == "interrupted" and "SIGINT" in m.error
    interrupted_id = m.run_id
    assert registry.list_runs()[0]["state"] == "interrupted"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    m = read_manifest(out)
    assert m.status == "done" and m.resumes == interrupted_id and m.metrics["shards_resumed"] == done
    stats = json.loads((out / "stats.json").read_text())
    assert stats["totals"]["docs_in"] == stats["totals"]["docs_kept"] + stats["totals"]["docs_dropped"]
    assert not list(out.rglob(".*.tmp-*"))


def _sandbox_owner(queue) -> None:  # a shard worker holding an HTML extraction helper process
    from lmforge.data.steps import ExtractSandbox

    sandbox = ExtractSandbox(len)
    sandbox.call("<html>x</html>", 30)
    queue.put(sandbox.proc.pid)
    time.sleep(300)


def test_extract_helper_does_not_outlive_a_stopped_worker():
    """A worker stopped mid-shard (as Ctrl-C stops them) must not leave its --extract-timeout helper behind."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_sandbox_owner, args=(queue,))
    worker.start()
    helper = queue.get(timeout=120)
    assert alive(helper)
    worker.terminate()
    worker.join()
    deadline = time.time() + 10
    while alive(helper) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(helper)
