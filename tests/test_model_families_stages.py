"""Every stage works for every model family: the serving runner (float32 exact; bf16 / int8 / int4 close), the engine
(continuous batching + prefix caching: greedy tokens equal the model's), eval's log-likelihoods, LoRA SFT + merge +
``export hf`` (loads back in ``transformers`` with the same logits), DPO and ``export gguf`` where llama.cpp's format
has the architecture.  Tiny random models of each family share the alignment tests' BPE tokenizer."""

from __future__ import annotations

import queue
import shutil

import pytest
import torch
from test_align import _dpo_config, _sft_config
from test_model_families import FAMILIES, hf_config

from lmforge.model.generate import generate
from lmforge.model.hf import load_model, save_model
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.serve.engine import Engine, EngineMetrics
from lmforge.serve.runner import ModelRunner
from lmforge.serve.sampling import SamplingParams

CTX = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tiny_model_dir, tmp_path_factory):
    """A tiny random model of one family with the shared tokenizer, as an HF folder."""
    base = load_model(tiny_model_dir).config
    d = hf_config(request.param).to_dict()
    d.update(vocab_size=base.vocab_size, max_position_embeddings=CTX, bos_token_id=base.eos_token_id,
             eos_token_id=base.eos_token_id, pad_token_id=base.eos_token_id)
    cfg = LlamaConfig.from_hf_dict(d)
    model = Llama(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # norms off their init so that their layout matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    save_model(model, folder)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).exists():
            shutil.copyfile(tiny_model_dir / name, folder / name)
    return folder


def _prompt(n: int = 40, seed: int = 0) -> list[int]:
    return torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_runner_matches_model_past_the_window(family_dir):
    model = load_model(family_dir)
    ids = torch.tensor([_prompt()])
    ref = model(ids)[0]
    runner = ModelRunner(model, "float32")
    cache = runner.allocate_cache(3, CTX)
    k = 12  # prefill past the sliding window (8), then decode one token at a time from slot 2
    first = runner.forward(ids[:, :k], torch.arange(k)[None], cache, torch.tensor([2]))
    torch.testing.assert_close(first[0], ref[k - 1], rtol=1e-4, atol=1e-4)
    for t in range(k, ids.shape[1]):
        out = runner.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache, torch.tensor([2]))
        torch.testing.assert_close(out[0], ref[t], rtol=1e-4, atol=1e-4)
    for dtype, quantize in (("bfloat16", None), ("float32", "int8"), ("float32", "int4")):
        low = ModelRunner(model, dtype, quantize)
        out = low.forward(ids, torch.arange(ids.shape[1])[None], low.allocate_cache(1, CTX), torch.tensor([0]))[0]
        p, q = torch.log_softmax(ref[-1], -1), torch.log_softmax(out, -1)
        assert float((p.exp() * (p - q)).sum()) < 0.05, (dtype, quantize)


def _run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    sinks = [queue.Queue() for _ in prompts]
    for p, q in zip(prompts, sinks):
        engine.add_request(p, params, q.put, start_worker=False)
    while engine.has_work():
        engine.step()
    out = []
    for q in sinks:
        ids = []
        while not q.empty():
            ids.extend(q.get().token_ids)
        out.append(ids)
    return out


class _PrefixHits(EngineMetrics):
    hits = 0

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.hits += hit_tokens


def test_engine_greedy_equals_model_greedy(family_dir):
    model = load_model(family_dir)
    engine = Engine.from_folder(family_dir, max_num_seqs=3, max_model_len=CTX)
    engine.metrics = _PrefixHits()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={i: -100 for i in engine.eos_token_ids})
        banned = torch.zeros(model.config.vocab_size)
        banned[list(engine.eos_token_ids)] = -100
        prompts = [_prompt(40, 0), _prompt(9, 1), _prompt(23, 2)]
        got = _run_all(engine, prompts, params)  # three requests batched together
        again = _run_all(engine, [prompts[0] + [7, 8, 9], prompts[1]], params)  # prefix-cache hits on prompt 0 / 1
        assert engine.metrics.hits > 0
    finally:
        engine.shutdown()
    model.lm_head.bias = torch.nn.Parameter(banned)  # the same eos ban in the reference greedy decode
    want = [generate(model, p, 10) for p in prompts + [prompts[0] + [7, 8, 9]]]
    assert got == want[:3]
    assert again == [want[3], want[1]]


def test_eval_loglikelihood_matches_model(family_dir):
    from lmforge.eval.harness import LM

    lm = LM.from_folder(family_dir)
    ctx, cont = "The for statement", " is used to iterate"
    c, k = lm._split(ctx, cont)
    logits = lm.model(torch.tensor([c + k]))[0, :-1]
    want = float(torch.log_softmax(logits, -1)[len(c) - 1:].gather(1, torch.tensor(k)[:, None]).sum())
    assert lm.loglikelihood([(ctx, cont)])[0] == pytest.approx(want, abs=1e-4)


def test_lora_sft_merge_and_export_hf_loads_in_transformers(family_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.align import sft
    from lmforge.align.lora import merge_adapter
    from lmforge.export.hf import export_hf

    m = sft.run(_sft_config(family_dir, lora_r=4, lora_alpha=8, lr=1e-2, max_steps=3, eval_every=3,
                            checkpoint_every=3, batch_size=2), tmp_path / "lora").metrics
    assert m["mode"] == "lora"
    merged_dir = merge_adapter(tmp_path / "lora", tmp_path / "merged")
    merged, base = load_model(merged_dir), load_model(family_dir)
    assert merged.config == base.config
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    out = export_hf(merged_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    x = torch.tensor([_prompt(20)])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, merged(x), atol=1e-4, rtol=1e-4)


def test_dpo_runs(family_dir, tmp_path):
    from lmforge.align import dpo

    m = dpo.run(_dpo_config(family_dir, max_steps=2, eval_every=2, checkpoint_every=2, batch_size=2),
                tmp_path / "dpo").metrics
    assert m["val_before"]["reward_margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 0
    reloaded = load_model(tmp_path / "dpo")
    assert reloaded.config.model_type == load_model(family_dir).config.model_type
