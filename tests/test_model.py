"""The Llama model: Hugging Face parity, folder round trips, KV-cache decoding."""

import pytest
import torch

from lmforge.model import KVCache, Llama, LlamaConfig
from lmforge.model.generate import generate
from lmforge.model.hf import load_model, save_model


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=96)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 4), (True, 1)])
def test_same_logits_as_transformers(tmp_path, tie, kv_heads):
    transformers = pytest.importorskip("transformers")
    model = Llama(tiny_config(tie_word_embeddings=tie, num_key_value_heads=kv_heads, rope_theta=5000.0))
    model.init_weights(seed=0)
    model.eval()
    save_model(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_loads_a_folder_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_kv_cache_decode_equals_full_recompute():
    model = Llama(tiny_config())
    model.init_weights(seed=3)
    model.eval()
    prompt = [5, 17, 42, 7, 99, 3]
    cached = generate(model, prompt, 25, temperature=0.0, use_cache=True)
    full = generate(model, prompt, 25, temperature=0.0, use_cache=False)
    assert cached == full and len(cached) == 25


@torch.no_grad()
def test_rows_at_different_positions_share_one_cache():
    """Two sequences in one batch, each at its own position, match running them alone (continuous batching)."""
    model = Llama(tiny_config())
    model.init_weights(seed=4)
    model.eval()
    a, b = torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), torch.tensor([[9, 8, 7]])
    cache = KVCache.allocate(model.config, slots=3, max_len=32)
    # prefill a into slot 2 and b into slot 0, separately
    model(a, positions=torch.arange(7)[None], cache=cache, rows=torch.tensor([2]))
    model(b, positions=torch.arange(3)[None], cache=cache, rows=torch.tensor([0]))
    # one decode step for both at once: a at position 7, b at position 3
    step = model(torch.tensor([[11], [12]]), positions=torch.tensor([[7], [3]]), cache=cache, rows=torch.tensor([2, 0]))
    ref_a = model(torch.cat([a, torch.tensor([[11]])], 1))[:, -1]
    ref_b = model(torch.cat([b, torch.tensor([[12]])], 1))[:, -1]
    torch.testing.assert_close(step[0, -1], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, -1], ref_b[0], atol=1e-5, rtol=1e-5)


def test_context_length_is_enforced():
    model = Llama(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_round_trip_and_param_count():
    cfg = tiny_config(tie_word_embeddings=False)
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert cfg.num_params() == sum(p.numel() for p in Llama(cfg).parameters())
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf_dict({"model_type": "gpt2"})


def test_rope_theta_from_transformers5_rope_parameters():
    d = tiny_config().to_hf_dict()
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    assert LlamaConfig.from_hf_dict(d).rope_theta == 100000.0
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf_dict(d)
