"""Alignment, second part: QLoRA-style int8 base, SFT before/after samples, DPO with LoRA, synth grade/prefs modes,
and LoRA + merge on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lmforge.align.chat_data import ChatTokenizer, encode_file, read_conversations
from lmforge.model.hf import load_model

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"
CTX = 256


def _sft_config(model_dir, **kw):
    from lmforge.align.sft import Config

    base = dict(model=str(model_dir), data=str(CHAT), on_error="skip", seq_len=CTX, batch_size=4, max_steps=20,
                lr=1e-2, warmup_steps=2, eval_every=20, checkpoint_every=20, val_fraction=0.1, seed=0, threads=1,
                lora_r=8, lora_alpha=16)
    base.update(kw)
    return Config(**base)


# -- QLoRA-style int8 base ------------------------------------------------------------------------------------------------
def test_int8_base_stores_a_quarter_and_keeps_lora_outputs_close(tiny_model_dir):
    from lmforge.align.lora import add_lora
    from lmforge.align.qlora import FrozenInt8Linear, model_state_bytes, quantize_frozen_base

    torch.manual_seed(0)
    model = add_lora(load_model(tiny_model_dir), r=4, targets=["q_proj", "v_proj"])
    for n, p in model.named_parameters():  # make the adapters non-zero so they matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randint(0, model.base_model.model.config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(x)
    full_bytes = model_state_bytes(model)
    info = quantize_frozen_base(model)
    assert info["quantized_linears"] == 2 * 7  # every projection of both layers, wrapped by LoRA or not
    assert info["base_bytes_after"] < 0.27 * info["base_bytes_before"]
    assert model_state_bytes(model) < full_bytes - 0.7 * info["base_bytes_before"]
    assert sum(isinstance(m, FrozenInt8Linear) for m in model.modules()) == 14
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, ref, atol=0.05) and not torch.equal(out, ref)  # int8 rounding, nothing more
    # gradients reach the adapters through the quantised layers
    model(x).float().logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_sft_trains_loss_falls_and_merges_onto_the_float_base(tiny_model_dir, tmp_path):
    from lmforge.align import sft
    from lmforge.align.lora import merge_adapter

    out = tmp_path / "qlora"
    m = sft.run(_sft_config(tiny_model_dir, quantize_base="int8", lr=2e-2, val_fraction=0.05), out).metrics
    assert m["quantize_base"] == "int8" and m["quantized_linears"] == 14
    assert m["final_val_loss"] < m["val_loss_before"] - 0.1
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    merged = load_model(merge_adapter(out, tmp_path / "merged"))
    tok = ChatTokenizer.from_folder(tiny_model_dir)
    _, val = sft.split_examples(encode_file(tok, CHAT, CTX, on_error="skip"), 0.05, 0)
    merged_loss = sft.assistant_loss(merged, val, pad_id=merged.config.pad_token_id)
    assert merged_loss == pytest.approx(m["final_val_loss"], abs=0.05)  # float base + adapters ≈ int8 base + adapters


def test_quantized_base_needs_lora(tiny_model_dir, tmp_path):
    from lmforge.align import sft

    with pytest.raises(ValueError, match="quantize_base needs LoRA"):
        sft.run(_sft_config(tiny_model_dir, lora_r=None, full=True, quantize_base="int8"), tmp_path / "x")


# -- SFT before/after samples ---------------------------------------------------------------------------------------------
def test_sft_writes_before_and_after_samples(tiny_model_dir, tmp_path):
    from lmforge.align import sft

    tok = ChatTokenizer.from_folder(tiny_model_dir)

    prompts = ["What is AI?", "Do you like music?"]
    out = tmp_path / "full"
    m = sft.run(_sft_config(tiny_model_dir, lora_r=None, full=True, lr=3e-3, max_steps=10, val_fraction=0.02, sample_prompts=prompts,
                            sample_max_tokens=12), out).metrics
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == prompts and m["samples"] == samples
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in samples)
    # "before" is the starting model's greedy answer, "after" the written model's
    assert [s["before"] for s in samples] == sft.answer_samples(load_model(tiny_model_dir), tok, prompts, 12)
    assert [s["after"] for s in samples] == sft.answer_samples(load_model(out), tok, prompts, 12)


# -- DPO with LoRA -------------------------------------------------------------------------------------------------------
def test_dpo_with_lora_raises_held_out_margin(tiny_model_dir, tmp_path):
    from lmforge.align import dpo
    from lmforge.align.lora import load_adapter

    out = tmp_path / "dpo_lora"
    cfg = dpo.Config(model=str(tiny_model_dir), data=str(PREFS), seq_len=CTX, batch_size=4, max_steps=25, lr=1e-2,
                     beta=0.1, warmup_steps=2, eval_every=25, checkpoint_every=25, val_fraction=0.2, seed=0, threads=1,
                     lora_r=8, lora_alpha=16)
    m = dpo.run(cfg, out).metrics
    assert m["mode"] == "lora" and m["trainable_share"] < 0.3
    assert m["val_before"]["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert m["val_after"]["logp_margin"] > m["val_before"]["logp_margin"] + 0.5
    assert m["val_after"]["reward_margin"] > 0.05 and m["val_after"]["reward_accuracy"] >= 0.7
    assert (out / "adapter_config.json").exists() and (out / dpo.REF_CACHE).exists()
    assert load_adapter(out) is not None


# -- synth: grade and preference modes against a scripted OpenAI-compatible server ---------------------------------------
class _Scripted(BaseHTTPRequestHandler):
    """``/v1/chat/completions`` answering like a model would, deterministically:

    * grading prompts: first a non-JSON answer, then JSON in a code fence (so the parse retry is exercised); the score is
      5 when the graded answer is longer than 3 words, else 1;
    * judge prompts: picks the answer that says "because" (the careful one);
    * anything else: a careful answer at temperature <= 0.5, a curt one above."""

    calls: list[dict] = []
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.calls.append(body)
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Grade the assistant"):
            answer = prompt.split("ASSISTANT: ")[-1].split("\n\nReply with JSON")[0]
            if body.get("seed", 0) % 100 == 0:
                text = "I would say it is fine."
            else:
                score = 5 if len(answer.split()) > 3 else 1
                text = f'Sure!\n```json\n{{"score": {score}, "reason": "graded"}}\n```'
        elif prompt.startswith("Two assistants answered"):
            a = prompt.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
            text = json.dumps({"better": "A" if "because" in a else "B", "reason": "it explains"})
        else:
            question = prompt.strip()
            text = f"{question} Yes, because it is so." if body["temperature"] <= 0.5 else "No."
        resp = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                          "total_tokens": len(prompt.split()) + len(text.split())}}
        data = json.dumps(resp).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted_server():
    _Scripted.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_parse_json_answers_robustly():
    from lmforge.align.synth import parse_grade, parse_json_object, parse_verdict

    assert parse_json_object('Here: ```json\n{"score": 4, "reason": "ok {fine}"}\n``` thanks') == \
        {"score": 4, "reason": "ok {fine}"}
    assert parse_json_object("no json {here") is None
    assert parse_grade('{"score": "3"}', 5) == {"score": 3, "reason": ""}
    assert parse_grade('{"score": 9, "reason": "x"}', 5) is None
    assert parse_grade('{"score": true}', 5) is None
    assert parse_verdict('{"better": "b", "reason": "r"}') == {"better": "B", "reason": "r"}
    assert parse_verdict('{"better": "both"}') is None


def test_synth_grade_mode_retries_unparseable_and_filters(scripted_server, tmp_path):
    from lmforge.align import synth

    data = tmp_path / "to_grade.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in [("What is AI?", "A field of computer science."), ("Are you a robot?", "Yes."),
                                         ("What is Python?", "A programming language, widely used.")]))
    cfg = synth.Config(base_url=scripted_server, model="judge", mode="grade", data=str(data), min_score=3,
                       concurrency=2, backoff_s=0.0)
    m = synth.run(cfg, tmp_path / "graded").metrics
    assert m["kept"] == 2 and m["rejected"] == 1 and m["reasons"] == {"low_score": 1}
    assert m["parse_retries"] == 3 and m["requests"] == 6  # every first answer was prose, every retry parsed
    kept = [json.loads(l) for l in (tmp_path / "graded" / "synth.jsonl").read_text().splitlines()]
    assert sorted(r["score"] for r in kept) == [5, 5] and all(r["grade_reason"] == "graded" for r in kept)
    assert len(read_conversations(tmp_path / "graded" / "synth.jsonl")) == 2  # still valid SFT data
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0

    no_retry = synth.Config(base_url=scripted_server, model="judge", mode="grade", data=str(data),
                            max_parse_retries=0, backoff_s=0.0)
    m = synth.run(no_retry, tmp_path / "graded0").metrics
    assert m["kept"] == 0 and m["reasons"] == {"unparseable_grade": 3}


def test_synth_prefs_mode_writes_dpo_ready_pairs(scripted_server, tmp_path, tiny_model_dir):
    from lmforge.align import dpo, synth

    cfg = synth.Config(base_url=scripted_server, model="m", mode="prefs", data=str(CHAT), num_tasks=6,
                       temperatures=[0.2, 1.0], concurrency=3, backoff_s=0.0)
    m = synth.run(cfg, tmp_path / "prefs").metrics
    assert m["kept"] == 6 and m["requests"] == 18  # two samples + one judgement per prompt
    sample_temps = sorted(c["temperature"] for c in _Scripted.calls if "Two assistants" not in
                          c["messages"][-1]["content"])
    assert sample_temps == [0.2] * 6 + [1.0] * 6
    pairs = [json.loads(l) for l in (tmp_path / "prefs" / "synth.jsonl").read_text().splitlines()]
    questions = [c.messages[0]["content"] for c in read_conversations(CHAT)[:6]]
    assert sorted(p["prompt"] for p in pairs) == sorted(questions)
    assert all("because" in p["chosen"] and p["rejected"] == "No." for p in pairs)  # the judge's pick, either order
    tok = ChatTokenizer.from_folder(tiny_model_dir)
    assert len(dpo.encode_pairs(tok, tmp_path / "prefs" / "synth.jsonl", 512)) == 6


# -- SmolLM2 -----------------------------------------------------------------------------------------------------------
def test_smollm2_lora_runs_and_merge_equals_adapter(tmp_path, smollm2_dir):
    from lmforge.align import sft
    from lmforge.align.lora import load_adapter, merge_adapter

    smol = smollm2_dir
    lines = CHAT.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[4:6]) + "\n")
    cfg = sft.Config(model=str(smol), data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
                     seq_len=64, batch_size=2, max_steps=2, lr=1e-3, warmup_steps=0, eval_every=2,
                     checkpoint_every=2, lora_r=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"], seed=0)
    out = tmp_path / "smol_lora"
    m = sft.run(cfg, out).metrics
    assert m["mode"] == "lora" and m["trainable_share"] < 0.01 and m["steps"] == 2
    assert m["final_val_loss"] is not None and m["val_loss_before"] is not None
    merged = load_model(merge_adapter(out, tmp_path / "smol_merged"))
    adapter = load_adapter(out)
    x = torch.tensor([ChatTokenizer.from_folder(smol).encode("The capital of France is Paris.")])
    with torch.no_grad():
        a, b = adapter(x), merged(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "smol_merged" / "config.json").read_text())["num_hidden_layers"] == 30
