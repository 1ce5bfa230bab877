"""Plain KV-cached generation for one batch of prompts (greedy or sampled).

The serving engine (``lmforge.serve.engine``) schedules many requests; this is the simple path used by evaluation and
tests: prefill the prompts, then decode one token per step reusing the cache.
"""

from __future__ import annotations

import torch

from lmforge.model.llama import KVCache, Llama


@torch.no_grad()
def generate(model: Llama, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, use_cache: bool = True, seed: int | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens; stops at ``eos_token_id``. Returns the new tokens."""
    ctx = model.config.max_position_embeddings
    max_new_tokens = max(0, min(max_new_tokens, ctx - len(prompt)))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt], dtype=torch.long)
    cache = KVCache.allocate(model.config, 1, len(prompt) + max_new_tokens, dtype=next(model.parameters()).dtype) \
        if use_cache else None
    out: list[int] = []
    pos = 0
    for _ in range(max_new_tokens):
        if use_cache:
            positions = torch.arange(pos, pos + ids.shape[1])[None]
            logits = model(ids, positions=positions, cache=cache, last_only=True)[0, -1]
            pos += ids.shape[1]
        else:
            full = torch.tensor([prompt + out], dtype=torch.long)
            logits = model(full, last_only=True)[0, -1]
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        ids = torch.tensor([[nxt]], dtype=torch.long)
    return out
