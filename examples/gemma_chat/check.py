"""After `lmforge run recipes/gemma_chat.yaml`: the merged Gemma chat model outside lmforge's own stages.

1. `lmforge export hf` of the merged folder loads in `transformers`, whose greedy tokens equal ours for a few prompts
   that are not in the training data (rendered with Gemma's chat template by transformers itself);
2. `lmforge serve` of the merged folder answers a chat through the official `openai` client.

    python examples/gemma_chat/check.py $LMFORGE_HOME/gemma_chat/merge [--quantize int8]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["What is Python?", "How old are you?", "Tell me about yourself.", "Do you like music?"]


def same_greedy_tokens(merged: Path, new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.export.hf import export_hf
    from lmforge.model.generate import generate
    from lmforge.model.hf import load_model

    out = export_hf(merged, Path(tempfile.mkdtemp()) / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours = load_model(merged)
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        a = generate(ours, ids, new_tokens)
        b = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False)[0, len(ids):].tolist()
        print(f"{p!r}: transformers {'==' if a == b else '!='} lmforge over {new_tokens} greedy tokens: "
              f"{tok.decode(b, skip_special_tokens=False)!r}")


def served_chat(merged: Path, quantize: str | None) -> None:
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(merged), "--port", str(port), "--model-name", "gemma-chat",
           "--max-model-len", "512", *(["--quantize", quantize] if quantize else [])]
    server = subprocess.Popen(cmd)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("lmforge serve did not come up")
                time.sleep(2)
        for q in ("Do you like music?", "What is Python?"):
            r = client.chat.completions.create(model="gemma-chat", messages=[{"role": "user", "content": q}],
                                               max_tokens=48, temperature=0)
            print(f"served ({quantize or 'fp32'}) {q!r} -> {r.choices[0].message.content!r} "
                  f"(finish_reason {r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens)")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged", type=Path)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--quantize", choices=["int8", "int4"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    same_greedy_tokens(args.merged, args.new_tokens)
    served_chat(args.merged, args.quantize)


if __name__ == "__main__":
    main()
