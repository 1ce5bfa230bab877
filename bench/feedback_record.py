"""What ``lmforge serve --record`` costs per answer, and how long ``lmforge feedback export`` takes.

    python bench/feedback_record.py [--answers 5000]

Writes N chat answers (a 3-message conversation, 2 choices of ~400 characters) through ``Recorder.record`` — the call
the server makes, on a worker thread, for every answer — and feedback on a third of them, into a temporary
``feedback.sqlite``; prints the per-answer write time (p50/p95) and the time to load everything and build the DPO
and SFT records (``feedback.export.build``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.feedback.export import build  # noqa: E402
from lmforge.feedback.store import Recorder, load, read_only  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "feedback.sqlite"
        rec = Recorder(db, "bench", tmp, "/models/m", "m", "sha256:0")
        times = []
        for i in range(args.answers):
            messages = [{"role": "system", "content": "You are helpful."},
                        {"role": "user", "content": f"Question {i % 500}: how do I sort a list in Python? " * 3}]
            choices = [{"text": f"Answer {i}.{j}: use sorted(xs) or xs.sort(). " * 10, "finish_reason": "stop"}
                       for j in range(2)]
            t = time.perf_counter()
            rec.record(f"chatcmpl-{i}", "chat", {"messages": messages}, {"temperature": 0.7, "seed": i, "n": 2},
                       choices, 40, 120, 0.5)
            times.append((time.perf_counter() - t) * 1e3)
            if i % 3 == 0:
                rec.add_feedback(f"chatcmpl-{i}", 0, "up", None, None, "a")
                rec.add_feedback(f"chatcmpl-{i}", 1, "down", "A better answer." if i % 6 == 0 else None, None, "a")
        rec.close()
        times.sort()
        print(f"{args.answers} answers recorded: write p50 {statistics.median(times):.3f} ms, "
              f"p95 {times[int(0.95 * (len(times) - 1))]:.3f} ms per answer; file {db.stat().st_size / 1e6:.1f} MB")
        t = time.perf_counter()
        with closing(read_only(db)) as con:
            rows = load(con)
        t_load = time.perf_counter() - t
        for fmt in ("dpo", "sft"):
            t = time.perf_counter()
            records, _, _ = build(rows, fmt)
            print(f"export {fmt}: load {t_load:.2f} s + build {time.perf_counter() - t:.2f} s → {len(records)} records")


if __name__ == "__main__":
    main()
