"""After `lmforge run recipes/gemma_chat.yaml`: the merged Gemma chat model outside lmforge's own stages.

Prompts: four questions that are not in the training data, then the held-out conversations of the SFT run behind the
merged folder (its `val_fraction` split, found through the merge and sft manifests), each without its last model turn.

1. `lmforge export hf` of the merged folder loads in `transformers`; for every prompt (rendered with Gemma's chat
   template by transformers itself) both answer greedily until `<end_of_turn>` or `--new-tokens`: the tokens must be
   equal, and the answers that end with `<end_of_turn>` are counted;
2. `lmforge serve` of the merged folder answers the same prompts through the official `openai` client: the answers
   whose `finish_reason` is `stop` (the turn ended) are counted, and each served text is compared with lmforge's.

    python examples/gemma_chat/check.py $LMFORGE_HOME/gemma_chat/merge [--quantize int8] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["What is Python?", "How old are you?", "Tell me about yourself.", "Do you like music?"]
END_OF_TURN = "<end_of_turn>"


def held_out_conversations(merged: Path) -> list[list[dict]]:
    """The SFT run's held-out conversations (the same split `lmforge sft` measured its val loss on), each cut before
    its last model turn; none when the merged folder does not lead back to an SFT run with a val split."""
    from lmforge.align.chat_data import ChatTokenizer, read_conversations
    from lmforge.align.sft import Config, load_examples

    try:
        adapter = Path(json.loads((merged / "manifest.json").read_text())["inputs"]["adapter"]["path"])
        sft = json.loads((adapter / "manifest.json").read_text())
    except (OSError, KeyError, ValueError):
        return []
    cfg = Config(**{**sft["config"], "data": sft["inputs"]["data"]["path"]})
    if cfg.val_data or not cfg.val_fraction:
        return []
    _, val, _ = load_examples(cfg, ChatTokenizer.from_folder(cfg.model), report=False)
    wanted = {ex.where for ex in val}
    return [c.messages[:-1] for c in read_conversations(cfg.data, "skip") if c.where in wanted]


def conversations(merged: Path, limit: int | None) -> list[list[dict]]:
    convs = [[{"role": "user", "content": p}] for p in PROMPTS] + held_out_conversations(merged)
    return convs[:limit] if limit else convs


def same_greedy_tokens(merged: Path, convs: list[list[dict]], new_tokens: int) -> list[str]:
    """lmforge's and transformers' greedy answers (up to `<end_of_turn>`); prints one line per prompt and a summary;
    returns lmforge's answer texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.export.hf import export_hf
    from lmforge.model.generate import generate
    from lmforge.model.hf import load_model

    out = export_hf(merged, Path(tempfile.mkdtemp()) / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    ours = load_model(merged)
    equal = ended = 0
    texts = []
    for msgs in convs:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        a = generate(ours, ids, new_tokens, eos_token_id=eot)
        b = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eot,
                        pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        equal += a == b
        ended += a[-1:] == [eot]
        texts.append(tok.decode(a, skip_special_tokens=True).strip())
        print(f"{msgs[-1]['content']!r}: transformers {'==' if a == b else '!='} lmforge ({len(a)} tokens, "
              f"{'ends its turn' if a[-1:] == [eot] else 'no <end_of_turn>'}): "
              f"{tok.decode(a, skip_special_tokens=False)!r}")
    print(f"SUMMARY greedy: {ended}/{len(convs)} answers end with {END_OF_TURN} within {new_tokens} tokens; "
          f"transformers gives the same tokens for {equal}/{len(convs)}")
    return texts


def served_chat(merged: Path, convs: list[list[dict]], ours: list[str], new_tokens: int, quantize: str | None) -> None:
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
        stopped = same = 0
        for msgs, mine in zip(convs, ours):
            r = client.chat.completions.create(model="gemma-chat", messages=msgs, max_tokens=new_tokens, temperature=0)
            c = r.choices[0]
            stopped += c.finish_reason == "stop"
            same += (c.message.content or "").strip().replace("\ufffd", "") == mine.replace("\ufffd", "")  # a cut
            # multi-byte character: decode() shows U+FFFD, the server holds the partial bytes back
            print(f"served ({quantize or 'fp32'}) {msgs[-1]['content']!r} -> {c.message.content!r} "
                  f"(finish_reason {c.finish_reason}, {r.usage.completion_tokens} tokens)")
        print(f"SUMMARY served ({quantize or 'fp32'}): {stopped}/{len(convs)} finish_reason stop; "
              f"{same}/{len(convs)} texts equal to lmforge's greedy answers")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("merged", type=Path)
    ap.add_argument("--new-tokens", type=int, default=48, help="Longest answer, in tokens (default 48).")
    ap.add_argument("--limit", type=int, help="Only the first N prompts (default: all).")
    ap.add_argument("--quantize", choices=["int8", "int4"], help="Serve quantised (the greedy check stays fp32).")
    ap.add_argument("--skip-serve", action="store_true", help="Only the transformers check.")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    convs = conversations(args.merged, args.limit)
    ours = same_greedy_tokens(args.merged, convs, args.new_tokens)
    if not args.skip_serve:
        served_chat(args.merged, convs, ours, args.new_tokens, args.quantize)


if __name__ == "__main__":
    main()
