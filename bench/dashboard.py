"""Page render time of the dashboard with N runs in the registry (default 1,000).

    python bench/dashboard.py [--runs 1000] [--repeats 30]

Builds a synthetic workspace in a temp folder: N runs in chains data → tokenizer → pretrain → eval (registry rows,
lineage edges, manifest.json in each folder; every pretrain run has a 400-step metrics.jsonl), then times each page
through the ASGI app in-process (FastAPI TestClient: routing, registry queries, templates; no network) and prints
p50/p95 ms per page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from lmforge import registry  # noqa: E402
from lmforge.dashboard.app import create_app  # noqa: E402

STAGES = ("data", "tokenizer", "pretrain", "eval")


def build(root: Path, n: int) -> dict[str, str]:
    con = registry.connect(root / "home" / "registry.sqlite")
    t0 = time.time() - n * 60
    some: dict[str, str] = {}
    prev = None
    with con:
        for i in range(n):
            stage = STAGES[i % 4]
            run_id = uuid.uuid4().hex[:12]
            folder = root / "runs" / f"{stage}-{i:05d}"
            folder.mkdir(parents=True)
            cfg = {"seed": i, "lr": 3e-3, "max_steps": 400, "tokenizer": str(prev[1]) if prev else None}
            metrics = {"final_train_loss": 3.2 + i % 7 / 10, "tokens_per_s": 1000 + i, "docs_kept": 500 + i}
            manifest = {"stage": stage, "stage_version": "1", "fingerprint": uuid.uuid4().hex[:16], "run_id": run_id,
                        "status": "done", "config": cfg, "inputs": {}, "outputs": ["a.bin"], "metrics": metrics,
                        "started_at": t0 + i * 60, "finished_at": t0 + i * 60 + 30, "duration_s": 30.0}
            (folder / "manifest.json").write_text(json.dumps(manifest))
            if stage == "pretrain":
                with open(folder / "metrics.jsonl", "w") as f:
                    for s in range(1, 401):
                        f.write(json.dumps({"step": s, "loss": 5 / s ** 0.3, "lr": 3e-3, "grad_norm": 1.0,
                                            "tokens": s * 4096, "tokens_per_s": 1000, "mfu": 0.01}) + "\n")
            con.execute("INSERT INTO runs(run_id, stage, path, fingerprint, status, started_at, finished_at, config,"
                        " metrics) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?)",
                        (run_id, stage, str(folder), manifest["fingerprint"], manifest["started_at"],
                         manifest["finished_at"], json.dumps(cfg), json.dumps(metrics)))
            if stage == "data":
                con.execute("INSERT INTO edges VALUES (?, ?, 'raw0', ?)", (f"/raw/{i}.jsonl", run_id, "sha256:x"))
            elif prev:
                con.execute("INSERT INTO edges VALUES (?, ?, ?, ?)", (str(prev[1]), run_id, STAGES[(i - 1) % 4],
                                                                       f"run:{prev[0]}"))
            prev = (run_id, folder)
            some.setdefault(stage, run_id)
    con.close()
    return some


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = build(root, args.runs)
        client = TestClient(create_app(root / "home"))
        pages = {
            "runs (all)": "/runs",
            "runs ?stage=pretrain": "/runs?stage=pretrain",
            "runs ?q=text": "/runs?q=pretrain-0001",
            "api/runs": "/api/runs",
            "run page": f"/runs/{ids['pretrain']}",
            "lineage": f"/runs/{ids['tokenizer']}/lineage",
            "curves page": f"/curves?run={ids['pretrain']}",
            "api metrics (400 steps)": f"/api/runs/{ids['pretrain']}/metrics",
            "eval": "/eval",
        }
        print(f"{args.runs} runs in the registry, {args.repeats} requests per page (in-process ASGI, no network)")
        print(f"{'page':28s} {'p50 ms':>8s} {'p95 ms':>8s}")
        for name, url in pages.items():
            assert client.get(url).status_code == 200, url
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                r = client.get(url)
                times.append((time.perf_counter() - t) * 1e3)
                assert r.status_code == 200
            times.sort()
            p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
            print(f"{name:28s} {statistics.median(times):8.1f} {p95:8.1f}")


if __name__ == "__main__":
    main()
