"""SFT full fine-tuning vs. LoRA, then DPO, on a tiny lmforge model; each run in its own process so peak RSS is its own.

Usage: python bench/align_tiny.py [WORKDIR]   (prints one JSON line per run; a few seconds each on 2 CPU cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT, PREFS = ROOT / "data/chat/chatterbot_en.jsonl", ROOT / "data/chat/preferences.jsonl"

BUILD = """
import json, sys
from pydoc_data.topics import topics
from lmforge.tokenizer.bpe import train_bpe
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.model.hf import save_model
texts = [json.loads(l)["messages"][1]["content"] for l in open(sys.argv[2])] + list(topics.values())
tok = train_bpe(texts, 2048, sys.argv[1]); eos = tok.token_to_id("<|endoftext|>")
m = Llama(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=eos,
          eos_token_id=eos, pad_token_id=eos)); m.init_weights(seed=0); save_model(m, sys.argv[1])
"""
RUN = """
import json, sys
from lmforge.align import sft, dpo
mod = {"sft": sft, "dpo": dpo}[sys.argv[1]]
cfg = mod.Config(**json.loads(sys.argv[2]))
m = mod.run(cfg, sys.argv[3], force=True).metrics
m.pop("data", None)
print(json.dumps({"run": sys.argv[4], **m}))
"""


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="align-bench-"))
    base = work / "base"
    subprocess.run([sys.executable, "-c", BUILD, str(base), str(CHAT)], check=True, capture_output=True)
    common = dict(model=str(base), data=str(CHAT), on_error="skip", seq_len=256, batch_size=4, max_steps=20,
                  warmup_steps=5, eval_every=20, checkpoint_every=20, seed=0)
    runs = [("sft", "full", {**common, "lr": 2e-3}),
            ("sft", "lora_r16", {**common, "lr": 5e-3, "lora_r": 16, "lora_alpha": 32})]
    for kind, name, cfg in runs:
        out = work / name
        r = subprocess.run([sys.executable, "-c", RUN, kind, json.dumps(cfg), str(out), name],
                           check=True, capture_output=True, text=True)
        print(r.stdout.strip().splitlines()[-1])
    dcfg = dict(model=str(work / "full"), data=str(PREFS), seq_len=256, batch_size=4, max_steps=20, lr=1e-3,
                beta=0.1, val_fraction=0.2, seed=0)
    for loss in ("sigmoid", "ipo", "simpo"):
        cfg = {**dcfg, "loss": loss, **({"beta": 2.0} if loss == "simpo" else {})}
        r = subprocess.run([sys.executable, "-c", RUN, "dpo", json.dumps(cfg), str(work / f"dpo_{loss}"), f"dpo_{loss}"],
                           check=True, capture_output=True, text=True)
        print(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
