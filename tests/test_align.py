"""Alignment: chat data validation and loss masks, packing without cross-contamination, SFT, LoRA + merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.align.chat_data import (IGNORE, ChatDataError, ChatTokenizer, DataStats, encode_conversation,
                                     encode_file, read_conversations)
from lmforge.align.sft import BatchPlan, collate, pack_rows, token_losses
from lmforge.model.hf import load_model

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"
CTX = 256


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> ChatTokenizer:
    return ChatTokenizer.from_folder(tiny_model_dir)


# -- chat data -----------------------------------------------------------------------------------------------------------
def test_reads_bundled_openai_data_and_alpaca(tmp_path):
    convs = read_conversations(CHAT)
    assert len(convs) > 500
    assert all(c.messages[-1]["role"] == "assistant" for c in convs)
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"instruction": "Name a prime number.", "output": "Seven.", "system": "Be brief."},
    ])
    a, b = read_conversations(alpaca)
    assert a.messages == [{"role": "user", "content": "Translate to French\n\ngood morning"},
                          {"role": "assistant", "content": "bonjour"}]
    assert [m["role"] for m in b.messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, ":1: messages[0].role: missing"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]},
     ":1: messages[0].content: expected a string, got int"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     ":1: messages[1].content: empty text"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
     ":1: messages[1].role: expected 'assistant', got 'user'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, ":1: messages[0].role: 'robot' is not one of"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ":1: messages: the conversation must end with an assistant"),
    ({"instruction": "Say hi"}, ":1: output: missing"),
    (["not", "an", "object"], ":1: expected a JSON object, got list"),
    ("{broken json", ":1: invalid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, expected):
    path = _write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(ChatDataError) as err:
        read_conversations(path)
    assert f"{path}{expected}" in str(err.value)


def test_bad_records_are_counted_skips_when_configured(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field."}]}
    long = {"messages": [{"role": "user", "content": "tell me " * 200}, {"role": "assistant", "content": "no"}]}
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        good, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        "{oops", long, good])
    stats = DataStats()
    examples = encode_file(tok, path, max_len=64, on_error="skip", stats=stats)
    assert len(examples) == 2
    assert stats.lines == 5 and stats.kept == 2
    assert stats.skipped == {"empty_text": 1, "invalid_json": 1, "too_long": 1}
    only_long = _write_jsonl(tmp_path / "long.jsonl", [good, good, good, long])
    with pytest.raises(ChatDataError,
                       match=r"long.jsonl:4: conversation is \d+ tokens, over seq_len 64; a larger --seq-len"):
        encode_file(tok, only_long, max_len=64)


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is a computer?"},
                {"role": "assistant", "content": "A machine that computes."},
                {"role": "user", "content": "Who invented it?"},
                {"role": "assistant", "content": "Charles Babbage, by most accounts."}]
    ex = encode_conversation(tok, messages, "assistant")
    full = ex.input_ids + [ex.labels[-1]]
    assert len(ex.input_ids) == len(ex.labels)
    # every label is the next input token, or ignored
    for t in range(len(ex.labels) - 1):
        assert ex.labels[t] in (IGNORE, ex.input_ids[t + 1])
    # token by token: the trained tokens decode to the assistant turns + their end-of-turn markers, nothing else
    trained = [i + 1 for i, l in enumerate(ex.labels) if l != IGNORE]
    pieces, run = [], []
    for pos in range(len(full)):
        if pos in trained:
            run.append(full[pos])
        elif run:
            pieces.append(run)
            run = []
    if run:
        pieces.append(run)
    texts = [tok.decode(p, skip_special_tokens=False) for p in pieces]
    assert texts == ["A machine that computes.<|im_end|>\n", "Charles Babbage, by most accounts.<|im_end|>\n"]
    # the prompt side (system, user turns, the assistant header) is never trained
    untrained = tok.decode([full[p] for p in range(len(full)) if p not in trained], skip_special_tokens=False)
    assert untrained == tok.render(messages[:2], add_generation_prompt=True) + "<|im_start|>user\nWho invented it?" \
        "<|im_end|>\n<|im_start|>assistant\n"

    last = encode_conversation(tok, messages, "last")
    last_text = tok.decode([l for l in last.labels if l != IGNORE], skip_special_tokens=False)
    assert last_text == "Charles Babbage, by most accounts.<|im_end|>\n"
    everything = encode_conversation(tok, messages, "all")
    assert everything.labels == full[1:]


# -- packing -------------------------------------------------------------------------------------------------------------
def test_segment_ids_restart_positions_and_block_attention():
    from lmforge.model.llama import segment_mask, segment_positions

    segs = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(segs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    m = segment_mask(segs)[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False, False, False]
    assert m[2].tolist() == [True, True, True, False, False, False, False, False]


def test_packed_batch_gives_each_conversation_its_unpacked_loss(tiny_model_dir, tok):
    model = load_model(tiny_model_dir)
    examples = encode_file(tok, CHAT, max_len=CTX, on_error="skip")[:12]
    rows = pack_rows([len(e.input_ids) for e in examples], 200)
    assert any(len(r) > 2 for r in rows)  # real packing happened
    packed = collate(examples, rows, pad_id=0, packed=True, seq_len=200)
    with torch.no_grad():
        pl = token_losses(model, packed)
        per_example_packed = {}
        for r, row in enumerate(rows):
            for k, i in enumerate(row, 1):
                per_example_packed[i] = float(pl[r][packed.segment_ids[r] == k].sum())
        for i, ex in enumerate(examples):
            alone = collate(examples, [[i]], pad_id=0, packed=False)
            assert per_example_packed[i] == pytest.approx(float(token_losses(model, alone).sum()), rel=1e-4, abs=1e-4)
        # without segment ids the same packed rows give different losses: attention crossed the boundaries
        crossed = token_losses(model, collate(examples, rows, pad_id=0, packed=False, seq_len=200))
    assert float((crossed - pl).abs().max()) > 1e-3


def test_batch_plan_is_a_pure_function_of_seed_and_step(tok):
    examples = encode_file(tok, CHAT, max_len=CTX, on_error="skip")[:40]
    a = BatchPlan(examples, 4, 128, True, seed=3)
    b = BatchPlan(examples, 4, 128, True, seed=3)
    assert [a.rows(s) for s in range(10)] == [b.rows(s) for s in reversed(range(10))][::-1]
    # each epoch covers every example exactly once
    first_epoch = a._epoch_rows(0)
    assert sorted(i for row in first_epoch for i in row) == list(range(40))


# -- SFT -----------------------------------------------------------------------------------------------------------------
def _sft_config(model_dir, **kw):
    from lmforge.align.sft import Config

    base = dict(model=str(model_dir), data=str(CHAT), on_error="skip", seq_len=CTX, batch_size=4, max_steps=40,
                lr=3e-3, warmup_steps=4, eval_every=20, checkpoint_every=10, val_fraction=0.1, seed=0, threads=1)
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def sft_full(tiny_model_dir, tmp_path_factory):
    from lmforge.align import sft

    out = tmp_path_factory.mktemp("sft") / "full"
    return out, sft.run(_sft_config(tiny_model_dir), out)


def test_sft_lowers_held_out_assistant_loss_and_writes_a_model_folder(sft_full, tok):
    from lmforge.align.sft import assistant_loss, split_examples

    out, manifest = sft_full
    m = manifest.metrics
    assert manifest.status == "done" and m["mode"] == "full" and m["steps"] == 40
    assert m["data"]["skipped"].get("too_long", 0) > 0  # the few long corpus answers are counted, not fatal
    assert m["final_val_loss"] < m["val_loss_before"] - 1.0
    assert (out / "loss.png").exists() and (out / "tokenizer.json").exists()
    # the written folder reloads and gives the logged held-out loss
    examples = encode_file(tok, CHAT, max_len=CTX, on_error="skip")
    _, val = split_examples(examples, 0.1, 0)
    assert assistant_loss(load_model(out), val, pad_id=tok.tokenizer.token_to_id("<|endoftext|>")) == \
        pytest.approx(m["final_val_loss"], abs=1e-3)


def test_sft_resumes_exactly_after_a_crash(sft_full, tiny_model_dir):
    from lmforge.align import sft
    from lmforge.artifacts import read_manifest, write_json

    out, _ = sft_full
    reference = load_model(out).state_dict()
    # simulate a crash after the step-30 checkpoint: later checkpoint and final weights gone, manifest says failed
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000040")
    (out / "model.safetensors").unlink()
    m = read_manifest(out)
    write_json(out / "manifest.json", {**m.model_dump(), "status": "failed"})
    resumed = sft.run(_sft_config(tiny_model_dir), out)
    assert resumed.status == "done"
    after = load_model(out).state_dict()
    for k in reference:
        assert torch.equal(reference[k], after[k]), k
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_lora_sft_trains_adapters_only_and_merge_equals_adapter_outputs(tiny_model_dir, tmp_path):
    from lmforge.align import sft
    from lmforge.align.lora import load_adapter, merge_adapter

    out = tmp_path / "lora"
    m = sft.run(_sft_config(tiny_model_dir, lora_r=8, lora_alpha=16, lr=1e-2, max_steps=20,
                            lora_targets=["q_proj", "v_proj", "up_proj"]), out).metrics
    assert m["mode"] == "lora" and 0 < m["trainable_share"] < 0.2
    assert m["final_val_loss"] < m["val_loss_before"]
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    ckpt = next((out / "checkpoints").glob("step-*"))
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(str(ckpt / "trainable.safetensors")))  # adapter-only checkpoints

    merged_dir = merge_adapter(out, tmp_path / "merged")
    adapter_model = load_adapter(out)
    merged = load_model(merged_dir)
    x = torch.randint(0, merged.config.vocab_size, (2, 48))
    with torch.no_grad():
        a, b = adapter_model(x), merged(x)
        base = load_model(tiny_model_dir)(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, base, atol=1e-3)  # the adapter did change the model
    assert (merged_dir / "tokenizer.json").exists()


def test_lora_rejects_unknown_target_modules(tiny_model_dir):
    from lmforge.align.lora import add_lora

    with pytest.raises(ValueError, match="qkv_proj"):
        add_lora(load_model(tiny_model_dir), targets=["qkv_proj"])


# -- DPO -----------------------------------------------------------------------------------------------------------------
def _dpo_config(model_dir, **kw):
    from lmforge.align.dpo import Config

    base = dict(model=str(model_dir), data=str(PREFS), seq_len=CTX, batch_size=4, max_steps=30, lr=2e-3, beta=0.1,
                warmup_steps=3, eval_every=15, checkpoint_every=10, val_fraction=0.2, seed=0, threads=1)
    base.update(kw)
    return Config(**base)


def test_dpo_raises_held_out_margin_with_cached_reference(sft_full, tmp_path, monkeypatch):
    from lmforge.align import dpo

    sft_dir, _ = sft_full
    out = tmp_path / "dpo"
    m = dpo.run(_dpo_config(sft_dir), out).metrics
    assert m["val_pairs"] == 10 and m["train_pairs"] == 38
    before, after = m["val_before"], m["val_after"]
    # policy == reference
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4) and before["reward_accuracy"] == 0.0
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    # beta-scaled: reward_margin = beta * (logp_margin - the reference's logp margin)
    assert after["reward_margin"] == pytest.approx(0.1 * (after["logp_margin"] - before["logp_margin"]), abs=1e-3)
    assert after["reward_margin"] > 0.1 and after["reward_accuracy"] >= 0.8
    assert m["final"]["reward_accuracy"] > 0.5 and m["final"]["reward_margin"] > 0
    cache = json.loads((out / dpo.REF_CACHE).read_text())
    assert len(cache["logps"]) == 48  # train + held-out pairs
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= logged[0].keys()

    # a resumed run reads the cached reference log-probs instead of recomputing them
    from lmforge.artifacts import read_manifest, write_json

    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000030")
    write_json(out / "manifest.json", {**read_manifest(out).model_dump(), "status": "failed"})
    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: pytest.fail("reference recomputed"))
    monkeypatch.setattr(dpo, "preference_metrics", lambda *a, **k: {"reward_margin": 0.0, "reward_accuracy": 0.0})
    assert dpo.run(_dpo_config(sft_dir), out).status == "done"


def test_preference_losses_match_their_formulas():
    from lmforge.align.dpo import preference_loss

    pc, pr = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    nc, nr = torch.tensor([5.0, 4.0]), torch.tensor([6.0, 2.0])
    rc, rr = torch.tensor([-11.0, -8.0]), torch.tensor([-11.0, -8.0])
    loss, st = preference_loss("sigmoid", 0.5, pc, pr, nc, nr, rc, rr)
    z = 0.5 * ((pc - rc) - (pr - rr))  # [1.0, -0.5]
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()))
    assert st["reward_accuracy"] == 0.5 and st["reward_margin"] == pytest.approx(0.25)
    loss, _ = preference_loss("ipo", 0.5, pc, pr, nc, nr, rc, rr)
    h = (pc - rc) / nc - (pr - rr) / nr
    assert float(loss) == pytest.approx(float(((h - 1.0) ** 2).mean()))
    loss, st = preference_loss("simpo", 2.0, pc, pr, nc, nr, rc, rr, gamma=0.5)
    z = 2.0 * (pc / nc - pr / nr) - 0.5
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()))


def test_bad_preference_records(tmp_path, tok):
    from lmforge.align.dpo import encode_pairs

    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
                                               {"prompt": "Hi?", "chosen": "Hello."},
                                               {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a",
                                                "rejected": "b"}])
    with pytest.raises(ChatDataError, match=r"p.jsonl:2: rejected: missing"):
        encode_pairs(tok, path, CTX)
    stats = DataStats()
    assert len(encode_pairs(tok, path, CTX, on_error="skip", stats=stats)) == 1
    assert stats.kept == 1 and sum(stats.skipped.values()) == 2


# -- synth ---------------------------------------------------------------------------------------------------------------
def test_retries_back_off_on_transient_errors_then_give_up():
    import httpx
    import openai

    from lmforge.align.synth import call_with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise openai.APIConnectionError(request=httpx.Request("POST", "http://x"))
        return "ok"

    retried = []
    assert call_with_retries(flaky, 3, 0.0, retried.append) == "ok" and len(calls) == 3 and len(retried) == 2
    calls.clear()
    with pytest.raises(openai.APIConnectionError):
        call_with_retries(lambda: flaky() if len(calls) < 5 else None, 1, 0.0)


def test_dedup_exact_and_near():
    from lmforge.align.synth import Deduper

    d = Deduper(0.7)
    assert d.add_if_new("What is a computer?") is None
    assert d.add_if_new("what is a COMPUTER") == "duplicate"
    assert d.add_if_new("What is a computer exactly?") == "near_duplicate"
    assert d.add_if_new("Who wrote Hamlet?") is None


def test_synth_against_our_own_server_is_accounted_and_resumable(sft_full, tmp_path, monkeypatch):
    from lmforge.align import synth
    from lmforge.artifacts import read_manifest, write_json
    from lmforge.serve.engine import Engine
    from lmforge.serve.smoke import running_server

    sft_dir, _ = sft_full
    engine = Engine.from_folder(sft_dir, max_num_seqs=4, max_model_len=CTX)
    out = tmp_path / "synth"
    try:
        with running_server(engine, "tiny-sft") as base_url:
            cfg = synth.Config(base_url=base_url, model="tiny-sft", seeds=str(CHAT), num_tasks=8, concurrency=3,
                               max_tokens=24, min_words=1, max_words=40, max_similarity=1.0, backoff_s=0.0,
                               price_in_per_mtok=1.0, price_out_per_mtok=2.0)
            m = synth.run(cfg, out).metrics
            assert m["kept"] + m["rejected"] == 8 and m["kept"] >= 1
            assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0 and m["requests"] >= 8
            assert m["cost_usd"] == pytest.approx((m["prompt_tokens"] + 2 * m["completion_tokens"]) / 1e6)
            kept = read_conversations(out / "synth.jsonl")  # valid SFT data
            assert len(kept) == m["kept"]
            # resume: a run killed after 3 tasks redoes only the missing ones
            lines = (out / "synth.jsonl").read_text().splitlines() + (out / "rejected.jsonl").read_text().splitlines()
            first3 = sorted(lines, key=lambda l: json.loads(l)["task"])[:3]
            (out / "synth.jsonl").write_text("".join(l + "\n" for l in first3 if '"messages"' in l))
            (out / "rejected.jsonl").write_text("".join(l + "\n" for l in first3 if '"messages"' not in l))
            write_json(out / "stats.json", {})
            write_json(out / "manifest.json", {**read_manifest(out).model_dump(), "status": "failed"})
            m2 = synth.run(cfg, out).metrics
            assert m2["kept"] + m2["rejected"] == 8
            done = [json.loads(l)["task"] for f in ("synth.jsonl", "rejected.jsonl")
                    for l in (out / f).read_text().splitlines()]
            assert sorted(done) == list(range(8))
            assert 5 <= m2["requests"] <= 10  # only the 5 missing tasks were requested (1-2 requests each)
    finally:
        engine.shutdown()


def test_keep_best_saves_the_step_with_the_lowest_held_out_loss(tiny_model_dir, tok, tmp_path):
    from lmforge.align import sft
    from lmforge.align.sft import assistant_loss

    # 6 training conversations, many steps at a constant high rate: the model learns them by heart, so the held-out
    # loss falls, then climbs — the best step is not the last
    lines = CHAT.read_text().splitlines()
    train = _write_jsonl(tmp_path / "train.jsonl", lines[:6])
    held = _write_jsonl(tmp_path / "held.jsonl", lines[200:240])
    out = tmp_path / "best"
    cfg = _sft_config(tiny_model_dir, data=str(train), val_data=str(held), max_steps=30, eval_every=3, lr=1e-2,
                      warmup_steps=0, min_lr_ratio=1.0, batch_size=2, keep_best=True, checkpoint_every=6,
                      keep_checkpoints=5)
    m = sft.run(cfg, out).metrics
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r}
    best_step = min(vals, key=vals.get)
    assert best_step < 30 and m["best_step"] == best_step and m["last_val_loss"] == pytest.approx(vals[30], abs=1e-4)
    assert m["final_val_loss"] == pytest.approx(vals[best_step], abs=1e-4)
    assert m["final_val_loss"] < m["last_val_loss"]
    # the written folder is the best step's model
    val = encode_file(tok, held, max_len=CTX, on_error="skip")
    assert assistant_loss(load_model(out), val, pad_id=tok.tokenizer.token_to_id("<|endoftext|>")) == \
        pytest.approx(vals[best_step], abs=1e-3)
    # a crash after the step-18 checkpoint: the resumed run still knows the best step and saves the same weights
    import shutil

    from lmforge.artifacts import read_manifest, write_json

    reference = load_model(out).state_dict()
    for c in (out / "checkpoints").glob("step-*"):
        if int(c.name.split("-")[1]) > 18:
            shutil.rmtree(c)
    (out / "model.safetensors").unlink()
    write_json(out / "manifest.json", {**read_manifest(out).model_dump(), "status": "failed"})
    resumed = sft.run(cfg, out)
    assert resumed.status == "done" and resumed.metrics["best_step"] == best_step
    after = load_model(out).state_dict()
    assert all(torch.equal(reference[k], after[k]) for k in reference)
    with pytest.raises(ValueError, match="keep_best needs held-out data"):
        _sft_config(tiny_model_dir, keep_best=True, val_fraction=0)
