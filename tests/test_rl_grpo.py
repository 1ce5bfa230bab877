"""GRPO on a tiny random model: it learns a trivially learnable reward, resumes bit-exactly after SIGKILL, keeps the
engine's weights in sync with the policy (LoRA merged in), and refuses bad input with clear messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.rl import grpo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def _task(tmp_path, n=24, prompt="Say something about topic {i}."):
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps({"prompt": prompt.format(i=i), "token": "e"}) + "\n" for i in range(n)))
    return f


def _cfg(model, task, **kw):
    base = dict(model=str(model), task=str(task), reward="token_fraction", full=True, group_size=8,
                prompts_per_step=4, max_steps=20, max_tokens=8, lr=3e-3, beta=0.0, eval_every=10, threads=1,
                tensorboard=False, checkpoint_every=5)
    return grpo.Config(**{**base, **kw})


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_a_learnable_reward(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    m = grpo.run(_cfg(tiny_model_dir, _task(tmp_path)), out).metrics
    rewards = [r["reward"] for r in _metrics(out) if "reward" in r]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, rewards  # fails if the advantages' sign or the update were wrong
    assert m["val_reward_after"] > m["val_reward_before"]
    for key in ("kl", "clip_fraction", "completion_len", "entropy", "reward_std", "reward_token_fraction"):
        assert key in _metrics(out)[-1]
    assert (out / "reward.png").stat().st_size > 0
    samples = json.loads((out / "samples.json").read_text())
    assert samples and all(s["before"] != s["after"] for s in samples)


def test_kl_to_reference_and_iterations_clip(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    grpo.run(_cfg(tiny_model_dir, _task(tmp_path), max_steps=4, beta=0.1, iterations=2, lr=1e-2,
                  loss_type="grpo", epsilon=0.05), out)
    recs = [r for r in _metrics(out) if "kl" in r]
    assert recs[0]["kl"] == 0.0 or recs[0]["kl"] < 1e-6  # the first batch: policy == reference
    assert recs[-1]["kl"] > 0  # after updates the policy has moved away from the reference
    assert any(r["clip_fraction"] > 0 for r in recs)  # the second iteration sees ratios outside 1 ± 0.05


KILLER = """
import os
from lmforge.rl.rewards import token_fraction
calls = 0
def reward(prompt, completion, *, token):
    global calls
    calls += 1
    if calls == int(os.environ.get("KILL_AT_CALL", "0")):
        os.kill(os.getpid(), 9)
    return token_fraction(prompt, completion, token=token)
"""


def _cli(model, task, out, env_extra):
    args = [sys.executable, "-m", "lmforge.cli", "grpo", "--model", str(model), "--task", str(task),
            "--reward", "killer:reward", "--full", "--group-size", "4", "--prompts-per-step", "2", "--max-steps", "6",
            "--max-tokens", "6", "--lr", "3e-3", "--beta", "0.05", "--eval-every", "3", "--checkpoint-every", "2",
            "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_extra["dir"]), str(ROOT)]), **env_extra["env"]}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_and_resume_is_bit_exact(tiny_model_dir, tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    task = _task(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = _cli(tiny_model_dir, task, whole, {"dir": tmp_path, "env": {}})
    assert r.returncode == 0, r.stderr[-2000:]
    # reward calls: 2 held-out before, 8 per step, 2 held-out after step 3: call 40 is inside step 5, after the
    # checkpoint of step 4
    r = _cli(tiny_model_dir, task, killed, {"dir": tmp_path, "env": {"KILL_AT_CALL": "40"}})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (killed / "model.safetensors").exists()
    assert (killed / "checkpoints" / "step-000004").is_dir()
    r = _cli(tiny_model_dir, task, killed, {"dir": tmp_path, "env": {}})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step-000004" in r.stderr
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"rollout_s", "ref_s", "train_s", "sync_s", "rollout_tokens_per_s"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(_metrics(whole)) == strip(_metrics(killed))


def test_engine_weights_follow_the_lora_policy(tiny_model_dir):
    from lmforge.align.lora import add_lora
    from lmforge.model.hf import load_model
    from lmforge.serve.engine import Engine

    engine = Engine.from_folder(tiny_model_dir, max_num_seqs=2, max_model_len=64)
    policy = add_lora(load_model(tiny_model_dir), r=4)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # peft starts B at zero: make the adapters change the output
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    want = policy(ids)[0, -1]
    before = engine.runner.forward(ids, torch.arange(5)[None], engine.cache, torch.tensor([0]))[0]
    assert not torch.allclose(before, want, atol=1e-3)
    grpo.sync_engine(engine, policy)
    after = engine.runner.forward(ids, torch.arange(5)[None], engine.cache, torch.tensor([0]))[0]
    torch.testing.assert_close(after, want, atol=1e-4, rtol=1e-4)


def test_bad_input_is_refused_clearly(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="GRPO needs a group of at least 2"):
        _cfg(tiny_model_dir, "x", group_size=1)
    long_task = _task(tmp_path, prompt="word " * 300 + "{i}")
    with pytest.raises(grpo.GRPOError, match=r"train prompt 0 is \d+ tokens; with max_tokens 8 it does not fit"):
        grpo.run(_cfg(tiny_model_dir, long_task, max_model_len=128), tmp_path / "long")
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(grpo.GRPOError, match="tokenizer differs from the policy's"):
        grpo.run(_cfg(tiny_model_dir, _task(tmp_path), ref_model=str(other), beta=0.1), tmp_path / "ref")


def test_all_failed_groups_are_skipped_and_reported(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        "def reward(prompt, completion, *, token):\n"
        "    if 'topic 1' in prompt:\n        raise ValueError('no score for this one')\n"
        "    return completion.count(token) / max(len(completion), 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    m = grpo.run(_cfg(tiny_model_dir, _task(tmp_path, n=4), reward="flaky:reward", max_steps=3, test_size=0), out)
    assert m.metrics["skipped_groups"] == 3  # topic 1 is in every step's batch of 4 (of 4 prompts, test split 0)
    assert m.metrics["reward_failures"] == {"flaky:reward": 3 * 8}
    assert all(r["skipped_groups"] == 1 for r in _metrics(out) if "reward" in r)


def test_truncated_importance_weight_scales_the_policy_term_only():
    old = torch.tensor([-1.0, -2.0, -0.5])
    sampled = torch.tensor([-1.0, -3.0, -0.1])  # ratios 1, e, e^-0.4
    w, st = grpo.rollout_is_weight(old, sampled, cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, float(torch.exp(torch.tensor(-0.4)))]))
    assert st["is_capped"] == 1 and abs(st["is_sum"] - (1 + torch.e + float(torch.exp(torch.tensor(-0.4))))) < 1e-5
    cfg = grpo.Config(model="m", task="arithmetic", full=True, beta=0.5, loss_type="dapo")
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.5, -0.5])
    adv, row_of, n = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    plain, _ = grpo.grpo_loss(logp, logp, ref, adv, row_of, 2, n, cfg)
    weighted, _ = grpo.grpo_loss(logp, logp, ref, adv, row_of, 2, n, cfg, is_weight=w)
    d = ref - logp
    kl = (torch.exp(d) - d - 1).sum() / 3
    assert torch.isclose(plain, (-adv).sum() / 3 + 0.5 * kl)  # ratio 1: the policy term is -A per token
    assert torch.isclose(weighted, (-adv * w).sum() / 3 + 0.5 * kl)  # the KL term is not reweighted


def test_int8_rollouts_are_corrected_by_the_engines_sampled_log_probs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    grpo.run(_cfg(tiny_model_dir, _task(tmp_path), max_steps=3, rollout_quantize="int8", test_size=4), out)
    recs = [r for r in _metrics(out) if "loss" in r]
    # the engine's int8 policy is close to the float32 one being trained: the weights are ~1, rarely capped (a
    # misaligned or wrong-token log-prob would put them far from 1)
    for r in recs:
        assert abs(r["rollout_is_mean"] - 1) < 0.05 and r["rollout_is_capped"] < 0.01, r
    out2 = tmp_path / "off"
    grpo.run(_cfg(tiny_model_dir, _task(tmp_path), max_steps=1, rollout_quantize="int8", rollout_is_cap=0.0,
                  test_size=4), out2)
    assert all("rollout_is_mean" not in r for r in _metrics(out2))
    out3 = tmp_path / "f32"  # float32 rollouts: the same policy samples and learns, nothing to correct
    grpo.run(_cfg(tiny_model_dir, _task(tmp_path), max_steps=1, test_size=4), out3)
    assert all("rollout_is_mean" not in r for r in _metrics(out3))
