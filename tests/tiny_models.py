"""Small random Llama-family models that the serving tests share."""

from __future__ import annotations

import torch

from lmforge.model.llama import Llama, LlamaConfig


def sharp_llama(**extra) -> Llama:
    """A 3-layer, 64-wide model (vocab 256, GQA 4/2 heads) whose embeddings and head are scaled up so its logits are
    peaked: greedy tokens are stable under float summation-order differences.  ``extra``: LlamaConfig switches
    (sliding windows, q/k norms, Gemma norms, ...)."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, **extra)
    m = Llama(cfg)
    m.init_weights(seed=0)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(20)
        m.lm_head.weight.mul_(30)
    return m.eval()
