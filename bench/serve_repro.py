"""How reproducible is a seeded request per serving dtype?  Prints, for each dtype:

* the largest logit difference for the same prompt computed whole vs. its last token on top of the cached prefix
  (what a prefix-cache hit changes), and for one decode row alone vs. among 7 (what batching changes);
* whether a seeded (temperature 1, top-p 0.9) and a greedy request give the same text on a repeat call, and how many
  of 8 identical concurrent requests give the first call's text.

    LMFORGE_HOME=/tmp/bench/home .venv/bin/python bench/serve_repro.py [--model DIR] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import queue

import torch

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams


def logit_drift(eng: Engine, ids: list[int]) -> tuple[float, float]:
    R, cache, n = eng.runner, eng.cache, len(ids)
    t = torch.tensor([ids])
    whole = R.forward(t, torch.arange(n)[None], cache, torch.tensor([0]))
    for ck, cv in zip(cache.k, cache.v):
        ck[1:8, :, :n - 1] = ck[0, :, :n - 1]
        cv[1:8, :, :n - 1] = cv[0, :, :n - 1]
    alone = R.forward(t[:, -1:], torch.tensor([[n - 1]]), cache, torch.tensor([1]))
    batch = R.forward(t[:, -1:].repeat(7, 1), torch.full((7, 1), n - 1), cache, torch.arange(1, 8))
    return float((whole - alone).abs().max()), float((batch - alone).abs().max())


def same_texts(eng: Engine, ids: list[int], greedy: bool, tokens: int) -> tuple[bool, int]:
    def params() -> SamplingParams:
        return SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0 if greedy else 0.9, max_tokens=tokens,
                              seed=1234, logit_bias={i: -100 for i in eng.chat_stop_token_ids})

    first = eng.generate_text(ids, params()).text
    again = eng.generate_text(ids, params()).text
    qs = [queue.Queue() for _ in range(8)]
    for q in qs:
        eng.add_request(ids, params(), q.put)
    equal = 0
    for q in qs:
        parts = []
        while not (out := q.get()).finished:
            parts.append(out.text)
        equal += "".join(parts) + out.text == first
    return first == again, equal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    if args.model is None:
        from lmforge.model.pretrained import materialize_smollm2

        args.model = str(materialize_smollm2())
    for dtype in args.dtypes.split(","):
        eng = Engine.from_folder(args.model, max_num_seqs=8, max_model_len=256, dtype=dtype)
        ids = eng.encode_chat([{"role": "user", "content": "Tell me about loops"}])
        cached, batched = logit_drift(eng, ids)
        eng.shutdown()
        eng = Engine.from_folder(args.model, max_num_seqs=8, max_model_len=256, dtype=dtype)  # a clean cache
        print(f"{dtype}: max |logit diff| prefix-cache hit {cached:.3g}, batch of 7 vs alone {batched:.3g}")
        for greedy in (False, True):
            repeat, equal = same_texts(eng, ids, greedy, args.tokens)
            print(f"  {'greedy' if greedy else 'seeded'}: repeat call same text {repeat}, "
                  f"8 concurrent same as first {equal}/8")
        eng.shutdown()


if __name__ == "__main__":
    main()
