"""The Gemma chat example (``recipes/gemma_chat.yaml``) on a tiny random Gemma 3 model: Gemma's own chat template
(renders as ``transformers`` renders it; the loss covers the model's turn and its ``<end_of_turn>``), the recipe's
LoRA SFT → merge → serve chain run by ``lmforge run``, the merged model exported with ``export hf`` giving the same
greedy tokens in ``transformers``, and the served chat stopping at ``<end_of_turn>``.  The real Gemma 3 270M run of the
same recipe is in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_model_families import hf_config
from tokenizers import Tokenizer

from lmforge.align.chat_data import ChatTokenizer, encode_conversation
from lmforge.model.families import GEMMA3_CHAT_TEMPLATE
from lmforge.model.generate import generate
from lmforge.model.hf import load_model, save_model
from lmforge.model.llama import Llama, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
GEMMA_SPECIALS = ["<bos>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(scope="module")
def tiny_gemma(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random Gemma 3 (local + global layers, QK-norm, soft-capping) with the alignment tests' BPE plus Gemma's
    turn markers, and Gemma's chat template in its tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("gemma") / "model"
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tok.add_special_tokens(GEMMA_SPECIALS)
    eos = tok.token_to_id("<|endoftext|>")
    d = hf_config("gemma3_text").to_dict()
    d.update(vocab_size=tok.get_vocab_size(), max_position_embeddings=256, bos_token_id=tok.token_to_id("<bos>"),
             eos_token_id=eos, pad_token_id=eos)
    model = Llama(LlamaConfig.from_hf_dict(d))
    model.init_weights(seed=0)
    save_model(model, folder)
    tok.save(str(folder / "tokenizer.json"))
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<bos>", eos_token="<|endoftext|>", chat_template=GEMMA3_CHAT_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is AI? "},
                {"role": "assistant", "content": "Machines that think."}, {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You are welcome."}]


def test_gemma_template_renders_as_transformers_and_trains_on_the_model_turns(tiny_gemma):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_gemma)
    tok = ChatTokenizer.from_folder(tiny_gemma)
    for msgs, gen in ((CONVERSATION, False), (CONVERSATION[:2], True)):
        assert tok.render(msgs, add_generation_prompt=gen) == hf_tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.render(CONVERSATION[:2], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is AI?<end_of_turn>\n<start_of_turn>model\n")
    ex = encode_conversation(tok, CONVERSATION)
    targets = tok.tokenizer.decode([t for t in ex.labels if t >= 0], skip_special_tokens=False)
    assert targets.replace(" ", "") == "Machinesthatthink.<end_of_turn>\nYouarewelcome.<end_of_turn>\n".replace(" ", "")


def lmforge(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


def test_gemma_chat_recipe_runs_sft_merge_serve_and_exports(tiny_gemma, tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = yaml.safe_load((ROOT / "recipes" / "gemma_chat.yaml").read_text())
    stages = recipe["stages"]
    assert stages.pop("gemma") == {"stage": "pretrained", "source": "gemma3-270m"}  # the real model; here a tiny one
    stages["sft"].update(model=str(tiny_gemma), max_steps=2, batch_size=2, eval_every=2, checkpoint_every=2,
                         sample_prompts=stages["sft"]["sample_prompts"][:1], sample_max_tokens=3, threads=1)
    stages["serve"]["max_tokens"] = 3
    path = tmp_path / "gemma_chat.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # stage order matters
    r = lmforge("run", str(path), "--workspace", str(tmp_path / "ws"), home=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    ws = tmp_path / "ws"
    m = json.loads((ws / "sft" / "manifest.json").read_text())["metrics"]
    assert m["mode"] == "lora" and m["val_loss_before"] > 0 and m["final_val_loss"] > 0
    assert set(m["samples"][0]) == {"prompt", "before", "after"}
    answers = json.loads((ws / "serve" / "answers.json").read_text())
    assert answers["chat"]["request"] == stages["serve"]["chat_message"] and answers["chat"]["answer"]

    from lmforge.export.hf import export_hf
    from lmforge.serve.engine import Engine

    merged = load_model(ws / "merge")
    out = export_hf(ws / "merge", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "What is Python?"}], tokenize=False,
                                      add_generation_prompt=True)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    ours = generate(merged, list(ids), 12)  # no eos: twelve tokens whatever comes
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours == theirs[0, len(ids):].tolist()

    # the example's own check: held-out prompts found through the merge → sft manifests, transformers' greedy tokens
    # equal to ours up to <end_of_turn>, and the same prompts through `lmforge serve` and the openai client
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "gemma_chat" / "check.py"), str(ws / "merge"),
                        "--limit", "6", "--new-tokens", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "LMFORGE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("gemma_check", ROOT / "examples" / "gemma_chat" / "check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    held_out = check.held_out_conversations(ws / "merge")
    assert len(held_out) == m["val_conversations"] and held_out[0][-1]["role"] == "user"
    assert "same tokens for 6/6" in r.stdout, r.stdout[-3000:]
    assert f"{held_out[0][-1]['content']!r}: transformers ==" in r.stdout, r.stdout[-3000:]
    assert "SUMMARY served (fp32): " in r.stdout and "6/6 texts equal to lmforge's greedy answers" in r.stdout

    engine = Engine.from_folder(ws / "merge", max_num_seqs=1, max_model_len=256)
    try:
        end_of_turn = engine.tokenizer.token_to_id("<end_of_turn>")
        assert end_of_turn in engine.chat_stop_token_ids
        assert engine.encode_chat([{"role": "user", "content": "hi"}])[-3:] == engine.encode(
            "<start_of_turn>model\n", add_special_tokens=False)[-3:]
    finally:
        engine.shutdown()


def test_runner_shares_gemmas_embedding_table_and_matches_past_the_window(tiny_gemma):
    """The serving runner scales the looked-up rows by sqrt(hidden) instead of keeping a scaled copy of the table (671
    MB for Gemma 3 270M), and its decode step past the sliding window (a view of the last `window` keys) computes
    what the model computes."""
    from lmforge.serve.runner import ModelRunner

    model = load_model(tiny_gemma)
    runner = ModelRunner(model, "float32")
    assert runner.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(10, 500, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)[0]
    cache = runner.allocate_cache(1, 64)
    runner.forward(ids[:, :3], torch.arange(3)[None], cache, torch.tensor([0]))
    for t in range(3, 30):  # the window is 8: most of these steps read a view that starts past key 0
        out = runner.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache, torch.tensor([0]))
        torch.testing.assert_close(out[0], ref[t], rtol=1e-4, atol=1e-4)
