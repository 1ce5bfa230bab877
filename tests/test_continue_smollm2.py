"""Continued pretraining of SmolLM2-135M end to end, through the CLI as a user runs it: data → tokenizer packed with
SmolLM2's own tokenizer → pretrain --init-from SmolLM2, on two bundled books at a tiny size; the result loads in
`transformers` with our logits and scores a lower held-out loss than SmolLM2 itself."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lmforge.artifacts import read_manifest
from lmforge.config import ConfigError
from lmforge.data.io import iter_documents
from lmforge.model.hf import load_config, load_model
from lmforge.recipe import load_recipe
from lmforge.tokenizer.shards import load_split, read_index
from lmforge.train.batches import sample_batch
from lmforge.train.init_from import check_init_folder, load_initial_model
from lmforge.train.pretrain import validation_loss

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ("data/demo/books/shakespeare-tempest.txt", "data/demo/books/kjv-ruth.txt")
SEQ_LEN, BATCH, STEPS, WINDOWS = 64, 2, 2, 4


def lmforge(*args: str, home: Path) -> None:
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", COLUMNS="200")
    env.pop("LMFORGE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"lmforge {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def chain(smollm2_dir, tmp_path_factory):
    """The folders of one tiny continued-pretraining run, every stage through `python -m lmforge.cli`."""
    w = tmp_path_factory.mktemp("cpt")
    home, base = w / "home", str(smollm2_dir)
    lmforge("data", "run", *(a for b in BOOKS for a in ("--inputs", b)), "--out", str(w / "data"), home=home)
    lmforge("tokenizer", "train", "--data", str(w / "data"), "--from-tokenizer", base, "--val-fraction", "0.2",
            "--out", str(w / "tok"), home=home)
    lmforge("pretrain", "--tokenizer", str(w / "tok"), "--init-from", base, "--seq-len", str(SEQ_LEN),
            "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--lr", "3e-4", "--warmup-steps", "1",
            "--eval-every", str(STEPS), "--eval-windows", str(WINDOWS), "--checkpoint-every", "1000",
            "--no-tensorboard", "--out", str(w / "pt"), home=home)
    return w


def test_the_smollm2_tokenizer_packs_its_49152_vocabulary(chain, smollm2_dir):
    index = read_index(chain / "tok" / "tokens")
    assert index["vocab_size"] == 49152 == load_config(smollm2_dir).vocab_size
    assert index["dtype"] == "uint16"  # 49152 < 2**16: two bytes a token
    assert (chain / "tok" / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()
    # the shards decode back to exactly the data stage's documents, one end-of-text token after each
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    eos = index["eos_id"]
    assert eos == tok.token_to_id("<|im_end|>")  # the eos_token of SmolLM2-Instruct's tokenizer_config.json
    decoded = []
    for split in ("train", "val"):
        ids = load_split(chain / "tok" / "tokens", split)
        assert ids[-1] == eos and int(ids.max()) < 49152
        ends = np.flatnonzero(ids == eos)
        decoded += [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(np.r_[-1, ends[:-1]], ends)]
    docs = [d["text"] for d in iter_documents(chain / "data")]
    assert sorted(decoded) == sorted(docs) and len(docs) >= 4


def test_training_starts_from_smollm2s_own_loss(chain, smollm2_dir):
    """Step 1's loss is SmolLM2's loss (by transformers) on batch 0: the weights were loaded, not re-initialised."""
    from transformers import AutoModelForCausalLM

    first = json.loads((chain / "pt" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    x, y = sample_batch(load_split(chain / "tok" / "tokens", "train"), BATCH, SEQ_LEN, 1337, 0)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item()
    assert first["loss"] == pytest.approx(expected, rel=1e-3)
    assert first["loss"] < math.log(49152) - 5  # ln(vocab) = 10.8 is what a fresh model scores


def test_held_out_loss_drops_below_smollm2s(chain, smollm2_dir):
    """SmolLM2's loss on the validation windows, by the pretrain stage's own validation code, vs the trained model's."""
    tok = chain / "tok"
    start = load_initial_model(smollm2_dir, tok, 49152, SEQ_LEN)
    before = validation_loss(start, load_split(tok / "tokens", "val"), SEQ_LEN, WINDOWS, torch.float32)
    after = read_manifest(chain / "pt").metrics["final_val_loss"]
    assert after < before - 0.05, (before, after)
    records = [json.loads(line) for line in (chain / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and records[-1]["val_loss"] == \
        pytest.approx(after, abs=1e-4)


def test_the_result_loads_in_transformers_with_our_logits(chain, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved, base = load_config(chain / "pt"), load_config(smollm2_dir)
    assert (saved.rope_theta, saved.tie_word_embeddings, saved.max_position_embeddings) == (100000.0, True, 8192)
    assert saved == base  # continued pretraining keeps the shape, context and special token ids
    ours = load_model(chain / "pt").eval()
    hf = AutoModelForCausalLM.from_pretrained(chain / "pt", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(chain / "pt")
    ids = torch.tensor([tok.encode("Full fathom five thy father lies; of his bones are coral made.")])
    with torch.no_grad():
        a, b = ours(ids), hf(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    # the weights did move away from SmolLM2's (tied: the head is the embedding)
    start = load_model(smollm2_dir)
    assert not torch.equal(start.model.embed_tokens.weight, ours.model.embed_tokens.weight)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False).count("<|im_start|>") == 2


def test_the_recipe_wires_data_tokenizer_pretrain_and_eval(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smollm2_continue.yaml", workspace=tmp_path)
    stages = {s.name: s for s in recipe.stages}
    assert [s.kind for s in recipe.stages] == ["pretrained", "data", "tokenizer", "eval", "pretrain", "eval"]
    base = stages["tokenizer"].raw["from_tokenizer"]
    assert stages["pretrain"].raw["init_from"] == base == stages["eval_before"].raw["model"] == "@smollm2"
    assert stages["pretrain"].raw["tokenizer"] == "@tokenizer" and stages["eval"].raw["model"] == "@pretrain"
    for key in ("seq_len", "max_windows"):  # before and after are scored on the same windows
        assert stages["eval_before"].raw[key] == stages["eval"].raw[key]
    assert stages["eval"].raw["seq_len"] == stages["pretrain"].raw["seq_len"]
    assert stages["eval"].raw["max_windows"] == stages["pretrain"].raw["eval_windows"]


def test_init_from_reads_smollm2s_config_in_either_transformers_layout(chain, smollm2_dir, tmp_path):
    raw = json.loads((smollm2_dir / "config.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    v5 = {k: v for k, v in raw.items() if k != "rope_theta"}  # transformers 5 nests rope_theta
    (folder / "config.json").write_text(json.dumps({**v5, "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 100000.0}}))
    assert check_init_folder(folder, chain / "tok", 49152, 8192).rope_theta == 100000.0
    with pytest.raises(ConfigError, match="seq_len: 8193 exceeds the context length 8192"):
        check_init_folder(folder, chain / "tok", 49152, 8193)
    (folder / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}))
    with pytest.raises(ConfigError, match=r"init_from: [^:]*config.json: rope_scaling: rope_type 'yarn' is not supported"):
        check_init_folder(folder, chain / "tok", 49152, 128)
