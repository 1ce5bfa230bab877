"""Run the demo recipe in a fresh workspace and print each stage's wall time and headline metrics.

    .venv/bin/python bench/demo_stages.py [--recipe recipes/demo.yaml]

Prints a markdown table (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    args = ap.parse_args()
    os.environ["LMFORGE_HOME"] = tempfile.mkdtemp(prefix="lmforge-bench-")
    from lmforge.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    t0 = time.time()
    results = run_recipe(recipe)
    total = time.time() - t0
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| stage | seconds | key metrics |")
    print("|---|---|---|")
    for r in results:
        keys = {k: v for k, v in r.manifest.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k}={v}" for k, v in list(keys.items())[:6])
        print(f"| {r.name} | {r.seconds:.1f} | {shown} |")
    print(f"| **total** | **{total:.1f}** | |")


if __name__ == "__main__":
    main()
