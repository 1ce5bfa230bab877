"""Continued pretraining from an HF model folder, activation checkpointing and torch.compile, on real text."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ConfigError
from lmforge.model.hf import load_config
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.tokenizer.bpe import train_bpe
from lmforge.tokenizer.shards import load_split, read_index
from lmforge.train import pretrain
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.batches import sample_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenized(pydoc_tokenized):
    return pydoc_tokenized


def tiny(tokenized, **kw):
    base = dict(tokenizer=str(tokenized), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=32,
                batch_size=4, max_steps=3, warmup_steps=1, eval_every=3, eval_windows=1, checkpoint_every=3, lr=1e-2,
                tensorboard=False)
    base.update(kw)
    return pretrain.Config(**base)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_folder(tokenized, tmp_path_factory):
    """A model folder written by transformers' own save_pretrained (another shape than the Config defaults)."""
    transformers = pytest.importorskip("transformers")
    vocab = read_index(tokenized / "tokens")["vocab_size"]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=50000.0, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # confident predictions, so the loss tells these weights apart from a fresh init
        model.lm_head.weight.mul_(50)
    folder = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(folder)
    shutil.copy(tokenized / "tokenizer.json", folder / "tokenizer.json")
    return folder, model


def test_init_from_an_hf_folder_starts_from_its_weights(tokenized, hf_folder, tmp_path):
    folder, hf_model = hf_folder
    out = tmp_path / "continued"
    cfg = tiny(tokenized, init_from=str(folder), max_steps=2, lr=1e-4)
    pretrain.run(cfg, out)
    # step 1's loss is the HF model's own loss on batch 0: the weights were loaded, not initialised
    x, y = sample_batch(load_split(tokenized / "tokens", "train"), cfg.batch_size, cfg.seq_len, cfg.seed, 0)
    with torch.no_grad():
        logits = hf_model(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item()
    assert abs(expected - np.log(read_index(tokenized / "tokens")["vocab_size"])) > 1.0
    assert losses(out)[0] == pytest.approx(expected, rel=1e-5)
    saved = load_config(out)  # the shape comes from the HF folder, not from the Config's shape fields
    assert (saved.hidden_size, saved.num_hidden_layers, saved.rope_theta, saved.tie_word_embeddings) == \
        (48, 3, 50000.0, False)


def test_init_from_refuses_a_foreign_tokenizer_or_a_too_long_context(tokenized, hf_folder, tmp_path):
    folder, _ = hf_folder
    other = tmp_path / "other-model"
    shutil.copytree(folder, other)
    lines = (REPO / "data/demo/books/shakespeare-macbeth.txt").read_text(encoding="utf-8").splitlines()
    train_bpe(lines, 600, tmp_path / "macbeth-tok")  # same size, other vocabulary
    shutil.copy(tmp_path / "macbeth-tok" / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(ConfigError, match="init_from: the tokenizer .* is not the model's own"):
        pretrain.run(tiny(tokenized, init_from=str(other)), tmp_path / "a")
    with pytest.raises(ConfigError, match="seq_len: 128 exceeds the context length 64"):
        pretrain.run(tiny(tokenized, init_from=str(folder), seq_len=128), tmp_path / "b")
    with pytest.raises(ConfigError, match="init_from: .* is not a model folder"):
        pretrain.run(tiny(tokenized, init_from=str(tmp_path)), tmp_path / "c")


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    plain, ckpt = Llama(cfg), Llama(cfg)
    plain.init_weights(seed=1)
    ckpt.init_weights(seed=1)
    assert apply_activation_checkpointing(ckpt) == 3 and apply_activation_checkpointing(ckpt) == 0
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # parameter names unchanged
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        grads = []
        for m in (plain, ckpt):
            m.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = m.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        (la, ga), (lb, gb) = grads
        assert torch.equal(la, lb)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-6, atol=1e-7, msg=n)


def test_activation_checkpointing_run_matches_a_plain_run(tokenized, tmp_path):
    pretrain.run(tiny(tokenized), tmp_path / "plain")
    pretrain.run(tiny(tokenized, activation_checkpointing=True), tmp_path / "ckpt")
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), abs=1e-4)


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile (inductor) needs a C++ compiler")
def test_compile_trains_a_few_steps_on_cpu(tokenized, tmp_path):
    m = pretrain.run(tiny(tokenized, compile=True, max_steps=2), tmp_path / "compiled")
    pretrain.run(tiny(tokenized, max_steps=2), tmp_path / "eager")
    assert m.status == "done" and np.isfinite(losses(tmp_path / "compiled")).all()
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-3)


def test_compile_without_a_cpp_compiler_trains_eagerly(tokenized, tmp_path, monkeypatch, capsys):
    """torch.compile on CPU needs a C++ compiler; without one the run says so and trains eagerly instead of failing."""
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    m = pretrain.run(tiny(tokenized, compile=True, max_steps=2), tmp_path / "run")
    assert "no C++ compiler" in capsys.readouterr().err
    assert m.status == "done" and np.isfinite(losses(tmp_path / "run")).all()


@pytest.mark.parametrize("native", [False, True])
def test_dtype_auto_follows_the_cpu(tokenized, tmp_path, monkeypatch, capsys, native):
    """dtype auto trains in bfloat16 only where the CPU computes it natively (AVX-512-BF16/AMX); elsewhere bf16 is
    emulated and slower, so auto means float32 — said at start and recorded in the run's metrics."""
    import lmforge.hardware as hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    m = pretrain.run(tiny(tokenized, dtype="auto", max_steps=1, eval_every=1, checkpoint_every=1), tmp_path / "r")
    want = "bfloat16" if native else "float32"
    assert m.metrics["dtype"] == want
    assert f"dtype {want} (auto:" in capsys.readouterr().err
    assert hardware.resolve_dtype("bfloat16", torch.device("cpu")) == ("bfloat16", "")  # explicit choices stay
