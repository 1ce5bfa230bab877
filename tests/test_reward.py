"""Reward models: `lmforge reward train` learns a toy preference (real answer > the same words shuffled) well above
chance on held-out pairs, saves a sequence-classification folder that `transformers` scores identically, and
`lmforge reward score` scores JSONL; bad records are named by file:line: field."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import registry
from lmforge.artifacts import read_manifest

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_preferences(path: Path, n: int = 160, seed: int = 0) -> Path:
    """chosen = a real chatterbot answer, rejected = its words shuffled (learnable from the text alone)."""
    rng = random.Random(seed)
    recs = []
    for line in CHAT.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        words = msgs[1]["content"].split()
        if not 4 <= len(words) <= 30:
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        recs.append({"prompt": msgs[0]["content"], "chosen": " ".join(words), "rejected": " ".join(shuffled)})
    rng.shuffle(recs)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:n]))
    return path


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    prefs = toy_preferences(d / "toy.jsonl")
    out = d / "rm"
    r = cli("reward", "train", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(out), "--full",
            "--seq-len", "256", "--batch-size", "8", "--max-steps", "40", "--lr", "3e-3", "--warmup-steps", "2",
            "--eval-every", "20", "--val-fraction", "0.25", "--threads", "1", "--seed", "0", home=d / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, d / "home"


def test_reward_model_learns_a_toy_preference_above_chance(trained, monkeypatch):
    out, home = trained
    m = read_manifest(out)
    assert m.status == "done" and m.stage == "reward"
    assert m.metrics["val_pairs"] == 40 and m.metrics["train_pairs"] == 120
    # 40 held-out pairs: chance is 0.5 (the untrained head scores near it); a learned preference is far above
    assert m.metrics["val_accuracy"] >= 0.75 > m.metrics["val_accuracy_before"] + 0.15
    assert m.metrics["val_after"]["margin"] > 0
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    assert [r["stage"] for r in registry.list_runs()] == ["reward"]
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists()


def test_transformers_loads_the_folder_with_the_same_scores(trained):
    from transformers import AutoModelForSequenceClassification

    from lmforge.align.reward import load_reward_model

    out, _ = trained
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    rm = load_reward_model(out)
    convs = [[{"role": "user", "content": "What is a computer?"},
              {"role": "assistant", "content": "A computer is an electronic machine that processes data."}],
             [{"role": "user", "content": "What is a computer?"},
              {"role": "assistant", "content": "machine processes A that computer electronic is data. an"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    ours = rm.score(convs)
    ids = [rm.encode(c) for c in convs]
    pad = cfg["pad_token_id"]
    batch = torch.full((len(ids), max(map(len, ids))), pad, dtype=torch.long)  # right-padded, as HF pools
    for i, s in enumerate(ids):
        batch[i, :len(s)] = torch.tensor(s)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch, attention_mask=(batch != pad).long()).logits[:, 0].tolist()
    assert theirs == pytest.approx(ours, abs=1e-4)
    assert ours[0] > ours[1]  # the learned preference: the real answer above its shuffled words
    assert rm.score_completions(["Hi"], ["Hello!"]) == pytest.approx([ours[2]], abs=1e-6)


def test_reward_score_cli_scores_jsonl(trained, tmp_path):
    from lmforge.align.reward import load_reward_model

    out, home = trained
    data = tmp_path / "answers.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "id": 7}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello!"}]}) + "\n")
    scored = tmp_path / "scored.jsonl"
    r = cli("reward", "score", "--model", str(out), "--data", str(data), "--output", str(scored), home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in scored.read_text().splitlines()]
    expected = load_reward_model(out).score_completions(["Hi"], ["Hello!"])[0]
    assert rows[0]["id"] == 7 and rows[0]["score"] == pytest.approx(expected, abs=1e-5)
    assert rows[1]["score"] == pytest.approx(expected, abs=1e-5)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!"}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    r = cli("reward", "score", "--model", str(out), "--data", str(bad), home=home)
    assert r.returncode != 0 and f"{bad}:2: completion: missing" in r.stderr and "Traceback" not in r.stderr


def test_bad_preference_record_is_named_by_file_line_field(tiny_model_dir, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    lines = PREFS.read_text().splitlines()[:3]
    lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "rejected"})
    prefs.write_text("\n".join(lines) + "\n")
    r = cli("reward", "train", "--model", str(tiny_model_dir), "--data", str(prefs), "--out", str(tmp_path / "rm"),
            "--max-steps", "1", home=tmp_path / "home")
    assert r.returncode != 0 and f"{prefs}:2: rejected: missing" in r.stderr and "Traceback" not in r.stderr


def test_lora_reward_model_merges_into_an_hf_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmforge.align import reward

    cfg = reward.Config(model=str(tiny_model_dir), data=str(PREFS), lora_r=4, seq_len=256, batch_size=4, max_steps=3,
                        lr=1e-2, warmup_steps=0, threads=1, seed=0)
    m = reward.run(cfg, tmp_path / "rm")
    assert m.metrics["mode"] == "lora" and m.metrics["trainable_share"] < 0.2 and m.metrics["steps"] == 3
    rm = reward.load_reward_model(tmp_path / "rm")
    ids = rm.encode([{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."}])
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        theirs = float(hf(input_ids=torch.tensor([ids])).logits[0, 0])
    assert theirs == pytest.approx(rm.score_ids([ids])[0], abs=1e-4)


def test_reward_training_resumes_exactly_after_a_crash(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from lmforge.align import reward
    from lmforge.artifacts import write_json

    cfg = reward.Config(model=str(tiny_model_dir), data=str(PREFS), full=True, seq_len=256, batch_size=4, max_steps=4,
                        checkpoint_every=2, keep_checkpoints=3, lr=1e-3, warmup_steps=1, threads=1, seed=0)
    out = tmp_path / "rm"
    reward.run(cfg, out)
    reference = load_file(str(out / "model.safetensors"))
    # a crash after the step-2 checkpoint: the later checkpoint and the model gone, the manifest says failed
    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "model.safetensors").unlink()
    write_json(out / "manifest.json", {**read_manifest(out).model_dump(), "status": "failed"})
    resumed = reward.run(cfg, out)
    assert resumed.status == "done" and resumed.resumes is not None
    after = load_file(str(out / "model.safetensors"))
    assert reference.keys() == after.keys() and all(torch.equal(reference[k], after[k]) for k in reference)
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
