"""Every supported model family against ``transformers`` on tiny random-initialised configs (no weights needed).

Tolerance: both models run in float64, but ``transformers`` (like us) computes the RoPE tables and the RMSNorm
statistics in float32 whatever the model dtype, and the two sides evaluate ``cos``/``sin``/``rsqrt`` with different
kernels, so intermediate values may differ by a float32 ulp (~6e-8 relative).  Through 3 layers that moves logits of
size ~1-10 by up to ~3e-6 (measured); the bound ``atol=3e-5`` is ten times that and still far below what any real
difference causes (a wrong norm offset, attention scale, mask or RoPE base moves logits by >1e-2).  Comparisons of
our model with itself (KV cache vs full forward) have no float32 step in between and use 1e-9.  The sequences
(20-24 tokens) are longer than the sliding window (8), so windowed layers see a truncated past.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model.generate import generate  # noqa: E402
from lmforge.model.hf import load_model, save_model  # noqa: E402
from lmforge.model.llama import KVCache, LlamaConfig  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(family: str):
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**BASE, tie_word_embeddings=False, rope_theta=5000.0)
    if family == "qwen2":
        return t.Qwen2Config(**BASE, tie_word_embeddings=True)
    if family == "qwen3":
        return t.Qwen3Config(**BASE, head_dim=32, tie_word_embeddings=True)
    if family == "mistral":
        return t.MistralConfig(**BASE, head_dim=16, sliding_window=8, tie_word_embeddings=False)
    if family == "gemma3_text":
        return t.Gemma3TextConfig(**{**BASE, "num_key_value_heads": 1}, head_dim=32, sliding_window=8,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  query_pre_attn_scalar=24, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                  final_logit_softcapping=30.0)
    if family == "phi3":
        return t.Phi3Config(**BASE, sliding_window=8, tie_word_embeddings=False)
    raise KeyError(family)


HF_ATOL = 3e-5
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3"]


def make_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # move every weight off its init (norms included) so each one matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    family = request.param
    hf = make_hf_model(family)
    folder = tmp_path_factory.mktemp(family)
    hf.save_pretrained(folder)
    ours = load_model(folder).double()
    return family, hf.double(), ours, folder


def ids(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def test_family_config_is_read(pair):
    family, hf, ours, folder = pair
    assert ours.config.model_type == family
    assert json.loads((folder / "config.json").read_text())["model_type"] == family


@torch.no_grad()
def test_logits_equal_transformers(pair):
    family, hf, ours, _ = pair
    x = ids()
    torch.testing.assert_close(ours(x), hf(x).logits, atol=HF_ATOL, rtol=0)


@torch.no_grad()
def test_greedy_tokens_equal_transformers(pair):
    family, hf, ours, _ = pair
    prompt = ids(12)[0].tolist()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, max_new_tokens=14) == theirs


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(pair):
    _, _, ours, _ = pair
    x = ids(24)
    full = ours(x)
    cache = KVCache.allocate(ours.config, 2, 24, dtype=torch.float64)
    steps = [ours(x[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache)]
    for t in range(5, 24):
        steps.append(ours(x[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-9, rtol=0)


@torch.no_grad()
def test_saved_folder_loads_in_transformers(pair, tmp_path):
    family, hf, ours, _ = pair
    save_model(ours, tmp_path, dtype=torch.float64)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                             attn_implementation="eager").eval()
    assert type(back) is type(hf)
    x = ids()
    torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-9, rtol=0)  # same code, same weights
    assert LlamaConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text())) == ours.config
