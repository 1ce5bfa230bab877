"""GRPO's training forward + backward (LoRA policy, log-probs and entropy of the completion tokens): groups packed one
per row (the prompt once, each completion attending to the prompt and itself) vs one prompt + completion row per
completion (TRL's layout), alternated in one process so that machine load hits both alike.

    python bench/grpo_packed_forward.py $(lmforge smollm2)      # 2 prompts x G=8, 30-token completions, 1 thread
"""

from __future__ import annotations

import sys
import time

import torch

from lmforge.align.lora import DEFAULT_TARGETS, add_lora
from lmforge.model.hf import load_model
from lmforge.rl import grpo
from lmforge.serve.engine import Engine


def main(model_dir: str, reps: int = 3, G: int = 8, n_prompts: int = 2, comp_len: int = 30) -> None:
    torch.set_num_threads(1)
    policy = add_lora(load_model(model_dir), 16, 32.0, 0.0, list(DEFAULT_TARGETS)).train()
    eng = Engine.from_folder(model_dir, max_num_seqs=1, max_model_len=256)
    ps = [eng.encode_chat([{"role": "user", "content": f"Say something about topic {i}."}]) for i in range(n_prompts)]
    gen = torch.Generator().manual_seed(0)
    prompts = [p for p in ps for _ in range(G)]
    comps = [torch.randint(100, policy.get_base_model().config.vocab_size, (comp_len,), generator=gen).tolist()
             for _ in prompts]
    packed = grpo.build_batch(prompts, comps, 0, G)
    rows = grpo.build_batch(prompts, comps, 0, 1)
    rows.mask = None  # one row per completion: plain causal attention
    print(f"prompt {len(ps[0])} tokens; packed {tuple(packed.input_ids.shape)}, rows {tuple(rows.input_ids.shape)}")
    for rep in range(reps):
        for name, batch in (("packed", packed), ("rows", rows)):
            t = time.time()
            lp, _ = grpo.token_logps(policy, batch, with_entropy=True)
            lp.sum().backward()
            print(f"{rep} {name:6s} forward+backward {time.time() - t:.2f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
