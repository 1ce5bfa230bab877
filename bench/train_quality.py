"""Demo-scale quality: held-out bits per byte of the demo model vs. a unigram baseline, as training tokens double.

Runs the data and tokenizer stages on the bundled corpus (``data/demo``; skipped when up to date), then pretrains
the demo model shape for ``--steps``, 2x, 4x ... steps (each run its own full cosine schedule) and scores the whole
held-out split.  The unigram baseline predicts every token from its training-split frequency (add-one smoothing),
the best a model can do without context.  Bits per byte divide the summed negative log-likelihood (in bits) by the
UTF-8 bytes of the scored text, so it is comparable across tokenizers.

    .venv/bin/python bench/train_quality.py --work /tmp/lmforge-quality --steps 50 --doublings 4
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from lmforge.data import stage as data_stage
from lmforge.eval.stage import token_byte_lengths
from lmforge.model.hf import load_model
from lmforge.tokenizer import stage as tok_stage
from lmforge.tokenizer.bpe import load_tokenizer
from lmforge.tokenizer.shards import eval_windows, load_split, read_index
from lmforge.train import pretrain


def unigram_bpb(train: np.ndarray, val: np.ndarray, vocab: int, byte_lengths: np.ndarray) -> float:
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    targets = np.asarray(val[1:], dtype=np.int64)  # the same tokens the model is scored on
    return float(-logp[targets].sum() / byte_lengths[targets].sum())


@torch.no_grad()
def model_bpb(model_dir: Path, val: np.ndarray, seq_len: int, byte_lengths: np.ndarray) -> float:
    model = load_model(model_dir)
    nll_bits, n_bytes = 0.0, 0
    for x, y in eval_windows(val, seq_len):
        logits = model(x)
        nll_bits += float(torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                            reduction="sum")) / math.log(2)
        n_bytes += int(byte_lengths[y.numpy()].sum())
    return nll_bits / n_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality"))
    ap.add_argument("--steps", type=int, default=50, help="steps of the shortest run")
    ap.add_argument("--doublings", type=int, default=4, help="runs with steps, 2*steps, 4*steps, ...")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    data = args.work / "data"
    data_stage.run(data_stage.Config(inputs=["data/demo"]), data)
    tok_dir = args.work / "tokenizer"
    tok_stage.run(tok_stage.Config(data=[str(data)], vocab_size=4096), tok_dir)
    tok, _ = load_tokenizer(tok_dir)
    lengths = token_byte_lengths(tok)
    vocab = read_index(tok_dir / "tokens")["vocab_size"]
    train = load_split(tok_dir / "tokens", "train")
    val = load_split(tok_dir / "tokens", "val")
    base = unigram_bpb(train, val, vocab, lengths)

    print(f"held-out split: {len(val):,} tokens; train split {len(train):,} tokens; vocab {vocab}; "
          f"unigram baseline {base:.3f} bits/byte", flush=True)
    rows = []
    for k in range(args.doublings):
        steps = args.steps * 2 ** k
        cfg = pretrain.Config(tokenizer=str(tok_dir), hidden_size=args.hidden, num_layers=args.layers,
                              seq_len=args.seq_len, batch_size=args.batch, max_steps=steps, lr=3e-3,
                              warmup_steps=max(1, steps // 10), eval_every=steps, checkpoint_every=steps,
                              dtype=args.dtype, tensorboard=False)
        out = args.work / f"model-{steps}"
        m = pretrain.run(cfg, out)
        rows.append((steps, m.metrics["tokens_trained"], m.metrics["params"], model_bpb(out, val, args.seq_len, lengths)))
        print(f"RESULT steps={steps} tokens={rows[-1][1]} val_bpb={rows[-1][3]:.4f} unigram={base:.4f}", flush=True)

    print("\n| steps | training tokens | params | val bits/byte | vs unigram |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| (unigram) | {len(train):,} | {vocab:,} | {base:.3f} | 1.00x |")
    for steps, tokens, params, bpb in rows:
        print(f"| {steps} | {tokens:,} | {params / 1e6:.1f}M | {bpb:.3f} | {bpb / base:.2f}x |")


if __name__ == "__main__":
    main()
