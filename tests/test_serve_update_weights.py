"""``Engine.update_weights``: writing some trained weights into a running engine leaves its serving tensors exactly as
a runner prepared from the updated model (fused q/k/v and gate/up rows, norms, the tied embedding and head,
block-quantised rows), for float32, bfloat16, int8 and int4; and GRPO's LoRA sync that writes only the adapted layers
equals a full reload of the merged model."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.model.hf import load_model
from lmforge.serve.engine import Engine
from lmforge.serve.runner import ModelRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same_tensors(runner: ModelRunner, want: ModelRunner) -> None:
    got, exp = runner.tensors(), want.tensors()
    assert len(got) == len(exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"serving tensor {i} differs"


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("float32", "int8"),
                                            ("float32", "int4")])
def test_updated_weights_equal_a_fresh_runner(tiny_model_dir, dtype, quantize):
    engine = Engine.from_folder(tiny_model_dir, max_num_seqs=2, max_model_len=64, dtype=dtype, quantize=quantize)
    trained = copy.deepcopy(engine.model)
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight",
             "model.layers.1.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight"]
    params = dict(trained.named_parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=gen) * 0.1)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    before = engine.runner.forward(ids, torch.arange(5)[None], engine.cache, torch.tensor([0]))
    engine.update_weights({n: params[n] for n in names})
    fresh = ModelRunner(trained, dtype, quantize)
    _assert_same_tensors(engine.runner, fresh)
    after = engine.runner.forward(ids, torch.arange(5)[None], engine.cache, torch.tensor([0]))
    assert not torch.equal(before, after)
    # a single-stream decode step (the fused C++ step where it runs: it reads the same tensors)
    cache = fresh.allocate_cache(1, 64)
    fresh.forward(ids, torch.arange(5)[None], cache, torch.tensor([0]))
    one = torch.tensor([[11]]), torch.tensor([[5]]), torch.tensor([0])
    torch.testing.assert_close(engine.runner.forward(one[0], one[1], engine.cache, one[2]),
                               fresh.forward(one[0], one[1], cache, one[2]), atol=1e-5, rtol=1e-5)
    for n, p in engine.model.named_parameters():  # the engine's model follows too
        assert torch.equal(p, dict(trained.named_parameters())[n]), n
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights({"model.layers.9.mlp.up_proj.weight": params[names[2]]})


def test_grpo_lora_sync_equals_reloading_the_merged_model(tiny_model_dir):
    from lmforge.align.lora import add_lora
    from lmforge.rl import grpo

    policy = add_lora(load_model(tiny_model_dir), r=4)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    synced = Engine.from_folder(tiny_model_dir, max_num_seqs=2, max_model_len=64)
    changed = grpo.trained_weights(policy)
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # the adapted layers only
    grpo.sync_engine(synced, policy)
    merged = copy.deepcopy(policy).merge_and_unload()
    _assert_same_tensors(synced.runner, ModelRunner(merged))
