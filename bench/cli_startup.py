"""Wall time of the CLI commands that should answer at once: `lmforge --help`, `runs`, `lineage --help`.

    python bench/cli_startup.py [--repeat 5] [--checkout DIR ...]

Each command runs `--repeat` times as a fresh `python -m lmforge.cli` process (PYTHONPATH pointing at each checkout,
so an older checkout can be compared); prints the median and the fastest run in seconds.  Quote `uptime` with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (["--help"], ["runs"], ["lineage", "--help"], ["data", "run", "--help"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--checkout", action="append", default=[], help="repository roots to compare (default: this one)")
    args = ap.parse_args()
    checkouts = args.checkout or [str(Path(__file__).resolve().parents[1])]
    home = tempfile.mkdtemp(prefix="lmforge-bench-home-")
    print(f"load: {os.getloadavg()}")
    for checkout in checkouts:
        env = dict(os.environ, PYTHONPATH=checkout, LMFORGE_HOME=home, COLUMNS="100")
        for cmd in COMMANDS:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "lmforge.cli", *cmd], env=env, cwd=checkout,
                               capture_output=True, check=True)
                times.append(time.perf_counter() - t0)
            print(f"{checkout}  lmforge {' '.join(cmd):<22} median {statistics.median(times):.2f}s  "
                  f"min {min(times):.2f}s")


if __name__ == "__main__":
    main()
