"""Kill -9 in the middle of a data run with MinHash on; the re-run finishes the remaining shards and its output is
identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge.data.stage import Config, run
from lmforge.data.peek import iter_shard

from test_data import DEMO, check_conservation
from test_data_steps import planted_near_duplicates

BOOKS = ["kjv-mark", "shakespeare-hamlet", "shakespeare-macbeth", "shakespeare-tempest", "shakespeare-julius-caesar",
         "kjv-ruth"]
CHILD = ("import json, sys; from lmforge.data.stage import Config, run; "
         "run(Config.model_validate(json.loads(sys.argv[1])), sys.argv[2])")


def corpus(src: Path) -> None:
    src.mkdir()
    texts, family = planted_near_duplicates(6, seed=3)
    for k, book in enumerate(BOOKS):
        text = (DEMO / "books" / f"{book}.txt").read_text()
        (src / f"{book}.txt").write_text(text)
        with open(src / f"planted{k}.jsonl", "w") as f:  # near-duplicate families spread over the shards
            for i in range(k, len(texts), len(BOOKS)):
                f.write(json.dumps({"id": f"t{i}", "text": texts[i], "family": family[i]}) + "\n")
    # an edited copy of a book: near-duplicate chunks in another shard
    (src / "ruth-copy.txt").write_text((DEMO / "books" / "kjv-ruth.txt").read_text().replace("Naomi", "Naomie", 3))


def outputs(out: Path) -> dict[str, list]:
    got = {}
    for sub in ("docs", "dropped"):
        for f in sorted((out / sub).glob("*.jsonl.zst")):
            got[f"{sub}/{f.name}"] = [(r["id"], r["text"], r["meta"].get("drop_reason"), r["meta"].get("duplicate_of"))
                                      for r in iter_shard(f)]
    return got


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    src = tmp_path / "in"
    corpus(src)
    cfg = Config(inputs=[str(src)], shards=6, minhash=True, txt_chunk_chars=4000)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json(), str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            done = list((killed / ".done").glob("part-*")) if (killed / ".done").is_dir() else []
            if done:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = len(list((killed / ".done").glob("part-*")))
    assert 0 < finished < 6, finished  # killed between shards: some done, some not
    assert not (killed / "stats.json").exists()

    m = run(cfg, killed)  # the re-run skips the finished shards
    assert m.status == "done" and m.metrics["shards_resumed"] == finished
    m2 = run(cfg, tmp_path / "clean")
    assert m2.metrics["shards_resumed"] == 0
    a, b = outputs(killed), outputs(tmp_path / "clean")
    assert a == b and a["docs/part-00000.jsonl.zst"]
    sa, sb = check_conservation(killed), check_conservation(tmp_path / "clean")
    assert sa["steps"][-1]["name"] == "minhash_dedup_v1" and sa["steps"][-1]["dropped"]["near_duplicate"] > 0
    assert [(s["name"], s["in"], s["kept"], s["dropped"]) for s in sa["steps"]] == \
        [(s["name"], s["in"], s["kept"], s["dropped"]) for s in sb["steps"]]
