"""Local vs Ray executor on the same data run, side by side: wall time at 1 and 2 workers, and the output check.

    python bench/data_ray.py [--inputs data/demo] [--shards 4] [--repeat 1]

Each configuration runs the data stage (MinHash, repeated-line removal and exact dedup on) into a fresh folder; the
Ray runs start a local Ray instance (its start-up is reported apart: `ray_init_s`) and stop it after.  Every run's
kept and dropped shards must be byte-identical to the first local run's.  Prints one JSON line per run and a summary
with the Ray/local ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def outputs(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for sub in ("docs", "dropped") for f in sorted((out / sub).iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", nargs="+", default=["data/demo"])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    from lmforge.data import ray_executor
    from lmforge.data.stage import Config, run

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-ray-"))
    reference = None
    times: dict[str, list[float]] = {}
    for rep in range(args.repeat):
        for executor, workers in (("local", 1), ("ray", 1), ("local", 2), ("ray", 2)):
            cfg = Config(inputs=args.inputs, shards=args.shards, workers=workers, executor=executor, minhash=True,
                         line_dedup=True)
            out = tmp / f"{executor}{workers}-{rep}"
            init_s = 0.0
            if executor == "ray":
                t = time.perf_counter()
                ray_executor.connect(None, workers)
                init_s = time.perf_counter() - t
            t = time.perf_counter()
            m = run(cfg, out)
            seconds = time.perf_counter() - t
            if executor == "ray":
                ray_executor.shutdown()
            got = outputs(out)
            reference = reference or got
            same = got == reference
            key = f"{executor}/{workers}"
            times.setdefault(key, []).append(seconds)
            print(json.dumps({"executor": executor, "workers": workers, "seconds": round(seconds, 2),
                              "ray_init_s": round(init_s, 2), "docs_in": m.metrics["docs_in"],
                              "docs_kept": m.metrics["docs_kept"], "identical_to_local": same}), flush=True)
            if not same:
                raise SystemExit(f"{key}: output differs from the local executor's")
            shutil.rmtree(out)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"summary": {k: round(v, 2) for k, v in best.items()},
                      "ray_over_local_1_worker": round(best["ray/1"] / best["local/1"], 3),
                      "ray_over_local_2_workers": round(best["ray/2"] / best["local/2"], 3),
                      "load": os.getloadavg()[0]}))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
