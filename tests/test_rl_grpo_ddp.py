"""GRPO under torchrun DDP for real: 2 CPU processes (gloo), each with its own engine rolling out its share of the
step's groups, equal one process (rewards and completion lengths exactly: per-row seeds do not depend on the rank;
losses and weights within the parity tolerances); a rank killed with SIGKILL mid-run resumes bit-exactly; only rank 0
writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parity import assert_curves_match, assert_weights_match
from lmforge.artifacts import read_manifest
from lmforge.rl import grpo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
RUN = dict(reward="rank_killer:reward", group_size=4, prompts_per_step=2, max_steps=4, max_tokens=6, lr=3e-3,
           beta=0.05, iterations=2, test_size=4, eval_every=2, checkpoint_every=2, threads=1, seed=0)
# the reward is token_fraction of "e"; the process whose RANK is KILL_RANK kills itself at its KILL_AT_CALL-th call
KILLER = """
import os
from lmforge.rl.rewards import token_fraction
calls = 0
def reward(prompt, completion, *, token):
    global calls
    calls += 1
    if os.environ.get("RANK") == os.environ.get("KILL_RANK") and calls == int(os.environ.get("KILL_AT_CALL", "0")):
        os.kill(os.getpid(), 9)
    return token_fraction(prompt, completion, token=token)
"""
TIMING = {"rollout_s", "ref_s", "train_s", "sync_s", "rollout_tokens_per_s"}


def _task(folder: Path) -> Path:
    f = folder / "task.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Say something about topic {i}.", "token": "e"}) + "\n"
                         for i in range(24)))
    return f


def _env(folder: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LMFORGE_HOME": str(folder / "home"),
            "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), **extra}


def _torchrun(model: Path, task: Path, out: Path, folder: Path, mode: dict, **env: str) -> subprocess.CompletedProcess:
    args = ["grpo", "--model", str(model), "--task", str(task), "--out", str(out)]
    for k, v in {**RUN, **mode}.items():
        flag = f"--{k.replace('_', '-')}"
        args += [flag] if v is True else [flag, str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(folder, **env), cwd=str(folder))


def _records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 2-process run (full fine-tuning, KL to the reference, 2 iterations per batch)."""
    folder = tmp_path_factory.mktemp("grpo_ddp")
    (folder / "rank_killer.py").write_text(KILLER)
    task = _task(folder)
    out = folder / "ddp"
    proc = _torchrun(tiny_model_dir, task, out, folder, {"full": True})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, task, out


def test_two_processes_equal_one_process(tiny_model_dir, ddp_run, monkeypatch):
    folder, task, ddp = ddp_run
    monkeypatch.setenv("LMFORGE_HOME", str(folder / "home"))
    monkeypatch.syspath_prepend(str(folder))
    single = folder / "single"
    one = grpo.run(grpo.Config(model=str(tiny_model_dir), task=str(task), full=True, **RUN), single)
    two = read_manifest(ddp)
    assert one.metrics["world_size"] == 1 and two.status == "done" and two.metrics["world_size"] == 2

    a, b = _records(single), _records(ddp)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]  # rank 0 alone wrote metrics: no duplicated lines
    # the same rollouts: each row's seed is a function of (seed, step, row), whichever process samples it
    for key in ("reward", "reward_std", "completion_len", "val_reward"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert any(r.get("reward_std", 0) > 0 for r in a)  # groups with a signal: the loss is not trivially 0
    assert_curves_match([r for r in a if "loss" in r], [r for r in b if "loss" in r])
    for key in ("kl", "entropy", "clip_fraction"):
        assert [r[key] for r in a if key in r] == pytest.approx([r[key] for r in b if key in r], rel=1e-3, abs=1e-5)
    assert any(r["kl"] > 0 for r in b if "kl" in r) and any(r["clip_fraction"] > 0 for r in b if "kl" in r)
    assert_weights_match(load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors")))
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_sigkill_of_one_rank_and_resume_is_bit_exact(tiny_model_dir, ddp_run):
    folder, task, whole = ddp_run
    killed = folder / "killed"
    # rank 1 scores 4 completions per step (no held-out evaluation: rank 0 does that): call 10 is inside step 3,
    # after the checkpoint of step 2
    proc = _torchrun(tiny_model_dir, task, killed, folder, {"full": True}, KILL_RANK="1", KILL_AT_CALL="10")
    assert proc.returncode != 0
    assert not (killed / "model.safetensors").exists()
    assert (killed / "checkpoints" / "step-000002").is_dir() and not (killed / "checkpoints" / "step-000004").exists()
    proc = _torchrun(tiny_model_dir, task, killed, folder, {"full": True})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr and "step-000002" in proc.stdout + proc.stderr
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(_records(whole)) == strip(_records(killed))


def test_prompts_that_do_not_split_over_the_processes_are_refused(tiny_model_dir, ddp_run):
    folder, task, _ = ddp_run
    proc = _torchrun(tiny_model_dir, task, folder / "odd", folder, {"full": True, "prompts_per_step": 3})
    assert proc.returncode != 0
    assert "prompts_per_step: 3 is not a multiple of the 2 processes" in proc.stdout + proc.stderr
    assert not (folder / "odd").exists()  # refused before any file was written



def test_two_processes_equal_one_process_with_lora(tiny_model_dir, ddp_run, monkeypatch):
    """The same with LoRA adapters (the reference is the policy with its adapters off): the adapters after 2
    processes equal the adapters after one; a learning rate high enough that the clipped ratio and the KL are live."""
    folder, task, _ = ddp_run
    monkeypatch.setenv("LMFORGE_HOME", str(folder / "home"))
    monkeypatch.syspath_prepend(str(folder))
    lora = {"lora_r": 4, "lora_alpha": 8.0, "lr": 3e-2}
    ddp = folder / "ddp_lora"
    proc = _torchrun(tiny_model_dir, task, ddp, folder, lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = folder / "single_lora"
    one = grpo.run(grpo.Config(model=str(tiny_model_dir), task=str(task), **{**RUN, **lora}), single)
    two = read_manifest(ddp)
    assert one.metrics["mode"] == two.metrics["mode"] == "lora" and two.metrics["world_size"] == 2

    a, b = _records(single), _records(ddp)
    for key in ("reward", "reward_std", "completion_len", "val_reward"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert_curves_match([r for r in a if "loss" in r], [r for r in b if "loss" in r])
    for key in ("kl", "entropy", "clip_fraction"):
        assert [r[key] for r in a if key in r] == pytest.approx([r[key] for r in b if key in r], rel=1e-3, abs=1e-5)
    assert any(r["kl"] > 0 for r in b if "kl" in r) and any(r["clip_fraction"] > 0 for r in b if "kl" in r)
    assert not (ddp / "model.safetensors").exists()
    wa, wb = (load_file(str(d / "adapter_model.safetensors")) for d in (single, ddp))
    # B starts at zero and A at random: compare each kind on its own, or A's initial norm would hide B's updates
    for kind in ("lora_A", "lora_B"):
        keys = [k for k in wa if kind in k]
        assert keys and all(float(wa[k].abs().max()) > 0 for k in keys)
        assert_weights_match({k: wa[k] for k in keys}, {k: wb[k] for k in keys})
