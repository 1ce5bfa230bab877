"""Tokenizer stage, pretraining (incl. crash + resume) and eval on real text (Python's own pydoc topics)."""

import json
import math

import pydoc_data.topics
import pytest
import torch
from safetensors.torch import load_file

from lmforge.artifacts import read_manifest
from lmforge.eval import stage as eval_stage
from lmforge.tokenizer import stage as tok_stage
from lmforge.tokenizer.bpe import load_tokenizer
from lmforge.tokenizer.shards import load_split, read_index
from lmforge.train import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for key, text in sorted(pydoc_data.topics.topics.items()):
            f.write(json.dumps({"id": key, "text": text, "meta": {"source": "pydoc_data"}}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenized(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok_stage.run(tok_stage.Config(data=str(corpus), vocab_size=600, val_fraction=0.1), out)
    return out


def tiny(tokenized, **kw):
    base = dict(tokenizer=str(tokenized), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=32,
                batch_size=4, max_steps=12, warmup_steps=2, eval_every=4, eval_windows=2, checkpoint_every=4, lr=1e-2)
    base.update(kw)
    return pretrain.Config(**base)


def test_tokenizer_stage_packs_every_document(tokenized, corpus):
    index = read_index(tokenized / "tokens")
    docs = [json.loads(l) for l in corpus.read_text().splitlines()]
    splits = index["splits"]
    assert splits["train"]["docs"] + splits["val"]["docs"] == len(docs)
    assert splits["val"]["docs"] > 0 and index["dtype"] == "uint16"
    tok, cfg = load_tokenizer(tokenized)
    train = load_split(tokenized / "tokens", "train")
    # every document ends with the end-of-text token, so boundaries survive packing
    assert int((train == index["eos_id"]).sum()) == splits["train"]["docs"]
    assert tok.decode(tok.encode("naïve café — 東京 🙂").ids) == "naïve café — 東京 🙂"
    assert cfg["eos_token"] == "<|endoftext|>" and "chat_template" in cfg
    assert read_manifest(tokenized).metrics["bytes_per_token"] > 1.5


def test_hf_autotokenizer_loads_ours(tokenized):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenized))
    tok, _ = load_tokenizer(tokenized)
    text = "def f(x):\n    return x ** 2  # squares"
    assert hf.encode(text) == tok.encode(text).ids
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_pretrain_learns_and_writes_an_hf_model_folder(tokenized, tmp_path):
    out = tmp_path / "model"
    m = pretrain.run(tiny(tokenized, max_steps=30, eval_every=10), out)
    assert m.status == "done" and m.metrics["steps"] == 30
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learns
    assert "val_loss" in records[-1]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "loss.png"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep-last-N
    # a second run with the same config is skipped
    again = pretrain.run(tiny(tokenized, max_steps=30, eval_every=10), out)
    assert again.run_id == m.run_id


def test_crash_and_resume_matches_an_uninterrupted_run(tokenized, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain.run(tiny(tokenized), straight)

    crashed = tmp_path / "crashed"
    real_sample = pretrain.sample_batch

    def crash_at_step_7(tokens, batch_size, seq_len, seed, step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_sample(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(pretrain, "sample_batch", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny(tokenized), crashed)
    assert read_manifest(crashed).status == "interrupted"  # a KeyboardInterrupt is an interruption, not a failure
    monkeypatch.setattr(pretrain, "sample_batch", real_sample)
    pretrain.run(tiny(tokenized), crashed)  # resumes from the step-4 checkpoint

    a = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_stops_with_a_clear_message(tokenized, tmp_path):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        pretrain.run(tiny(tokenized, lr=1e6, max_steps=20, grad_clip=0.0), tmp_path / "nan")


def test_eval_bits_per_byte(tokenized, tmp_path):
    model_dir = tmp_path / "model"
    pretrain.run(tiny(tokenized), model_dir)
    tok, _ = load_tokenizer(model_dir)
    lengths = eval_stage.token_byte_lengths(tok)
    text = "Exceptions — raised “here” 東京"
    assert lengths[tok.encode(text).ids].sum() == len(text.encode("utf-8"))

    m = eval_stage.run(eval_stage.Config(model=str(model_dir), data=str(tokenized), max_windows=4,
                                         prompts=["The for statement"], max_new_tokens=5), tmp_path / "eval")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    mt = res["metrics"]
    assert mt["val_tokens_scored"] == 4 * 32
    assert mt["val_bpb"] == pytest.approx(mt["val_loss"] * mt["val_tokens_scored"] / math.log(2)
                                          / mt["val_bytes_scored"], rel=1e-3)
    assert math.isclose(mt["val_ppl"], math.exp(mt["val_loss"]), rel_tol=1e-3)
    assert res["samples"][0]["prompt"] == "The for statement" and m.metrics["val_loss"] == mt["val_loss"]
    assert (tmp_path / "eval" / "results.md").exists()
