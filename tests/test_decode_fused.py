"""The serving decode step against the reference float32 model, one stream at a time (``ModelRunner``'s B=1, T=1
path: fused QKV and gate+up matmuls, slice writes into the cache slot, no mask), at every precision.

Tolerances: float32 logits within 1e-4 of ``Llama.forward`` on the whole sequence and the same greedy tokens; bf16 /
int8 / int4 within a KL divergence of 0.01 / 0.01 / 0.02 nats of the float32 next-token distribution at every step and
the same argmax wherever the reference's top two logits are more than 1.0 apart (stable), teacher-forced on the
reference's greedy continuation."""

from __future__ import annotations

import pytest
import torch

from lmforge import hardware
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.serve.runner import ModelRunner

PROMPT, STEPS = 8, 24


@pytest.fixture(scope="module")
def model() -> Llama:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = Llama(cfg)
    m.init_weights(seed=0)
    with torch.no_grad():  # logits a few units apart (not flat, not one-hot), a greedy continuation that varies
        m.model.embed_tokens.weight.mul_(20)
        m.lm_head.weight.mul_(30)
    return m.eval()


@pytest.fixture(scope="module")
def reference(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [PROMPT + STEPS], float32 logits [PROMPT + STEPS, vocab]) of greedy decoding by full recompute."""
    ids = torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        for _ in range(STEPS):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        logits = model(torch.tensor([ids]))[0]
    return torch.tensor(ids), logits


def _decode(runner: ModelRunner, ids: torch.Tensor, slot: int = 1, free_running: bool = False) -> tuple[list, list]:
    """Prefill PROMPT tokens into cache slot ``slot`` of a 2-slot cache, then decode one token per step; returns the
    logits of every step and the tokens fed (``ids`` teacher-forced, or the runner's own argmax if free running)."""
    cache = runner.allocate_cache(2, 64)
    rows = torch.tensor([slot])
    out = [runner.forward(ids[None, :PROMPT], torch.arange(PROMPT)[None], cache, rows)[0]]
    fed = ids[:PROMPT].tolist()
    for t in range(PROMPT, PROMPT + STEPS - 1):
        nxt = int(out[-1].argmax()) if free_running else int(ids[t])
        fed.append(nxt)
        out.append(runner.forward(torch.tensor([[nxt]]), torch.tensor([[t]]), cache, rows)[0])
    return out, fed


def test_float32_decode_equals_reference(model, reference):
    ids, ref = reference
    logits, fed = _decode(ModelRunner(model, "float32"), ids, free_running=True)
    assert fed == ids[:PROMPT + STEPS - 1].tolist()  # the same greedy tokens, by its own argmax
    for i, lg in enumerate(logits):
        torch.testing.assert_close(lg, ref[PROMPT - 1 + i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,quantize,max_kl", [("bfloat16", None, 0.01), ("float32", "int8", 0.01),
                                                    ("float32", "int4", 0.02)])
def test_low_precision_decode_tracks_reference(model, reference, dtype, quantize, max_kl):
    ids, ref = reference
    logits, _ = _decode(ModelRunner(model, dtype, quantize), ids)
    stable = 0
    for i, lg in enumerate(logits):
        p = torch.log_softmax(ref[PROMPT - 1 + i], -1)
        q = torch.log_softmax(lg, -1)
        kl = float((p.exp() * (p - q)).sum())
        assert -1e-6 < kl < max_kl, (i, kl)
        top2 = ref[PROMPT - 1 + i].topk(2).values
        if float(top2[0] - top2[1]) > 1.0:
            stable += 1
            assert int(lg.argmax()) == int(ids[PROMPT + i]), i
    assert stable >= STEPS // 3, stable  # the check above ran on a good share of the steps


@pytest.mark.parametrize("native", [False, True])
def test_quantised_activations_follow_the_cpu(model, reference, monkeypatch, native):
    """int8/int4 matmuls quantise float32 inputs themselves; around them a bf16 request computes in bf16 only on CPUs
    with native bf16 (norms, attention and the cache), and a float32 one in float32 everywhere."""
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    assert ModelRunner(model, "float32", "int8").act_dtype == torch.float32
    runner = ModelRunner(model, "bfloat16", "int8")
    want = torch.bfloat16 if native else torch.float32
    assert runner.act_dtype == want
    assert runner.allocate_cache(1, 8).k[0].dtype == want
    ids, ref = reference
    logits, _ = _decode(runner, ids)
    assert logits[-1].dtype == torch.float32
    p, q = torch.log_softmax(ref[-2], -1), torch.log_softmax(logits[-1], -1)
    assert float((p.exp() * (p - q)).sum()) < 0.02


@pytest.mark.slow  # minutes of inductor C++ compilation on a 2-core CPU, even for this model
def test_compiled_decode_equals_eager(model, reference, tmp_path, monkeypatch):
    """``compile=True``: the single-stream step as one torch.compile graph (dynamic in the cache length) gives the
    eager step's logits and the reference's greedy tokens."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    ids, ref = reference
    runner = ModelRunner(model, "float32", compile=True, fused=False)  # compile: where the fused C++ step is not
    logits, fed = _decode(runner, ids, free_running=True)
    assert runner._compiled is not None  # it did not fall back
    assert fed == ids[:PROMPT + STEPS - 1].tolist()
    for i, lg in enumerate(logits):
        torch.testing.assert_close(lg, ref[PROMPT - 1 + i], rtol=1e-4, atol=1e-4)


def test_compile_failure_falls_back_to_eager_with_one_log_line(model, reference, tmp_path, monkeypatch, caplog):
    """No C++ compiler (what inductor needs on CPU): one warning, then every step eagerly, with the same results."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing cached: it must compile
    torch._dynamo.reset()  # no graph of an earlier test reused
    ids, ref = reference
    runner = ModelRunner(model, "float32", compile=True, fused=False)  # compile: where the fused C++ step is not
    # inductor's own patch(): monkeypatch's undo deletes the keys of torch's config module (later compiles then fail)
    with inductor_config.patch({"fx_graph_cache": False, "cpp.cxx": (None, str(tmp_path / "no-such-c++"))}), \
            caplog.at_level("WARNING", logger="lmforge.serve"):
        logits, fed = _decode(runner, ids, free_running=True)
    warnings = [r for r in caplog.records if "torch.compile of the decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and runner._compiled is None
    assert fed == ids[:PROMPT + STEPS - 1].tolist()
    torch.testing.assert_close(logits[-1], ref[-2], rtol=1e-4, atol=1e-4)
