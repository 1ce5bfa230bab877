"""FSDP2 (``fully_shard``) over 2 CPU processes (torchrun, gloo): the same losses, gradient norms and weights as one
process; checkpoints in the single-process format; a run stopped by SIGTERM and resumed under FSDP ends where an
uninterrupted FSDP run does; ``parallel: fsdp`` in a single process trains unsharded.  SFT (full fine-tuning) too."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align import sft
from lmforge.artifacts import read_manifest
from lmforge.config import ConfigError
from lmforge.model.llama import Llama
from lmforge.tokenizer.shards import read_index
from lmforge.train import pretrain
from lmforge.train.checkpoint import load_checkpoint
from parity import LATE_WEIGHTS_REL, WEIGHTS_REL, assert_curves_match, assert_weights_match

CHAT = Path(__file__).resolve().parents[1] / "data" / "chat" / "chatterbot_en.jsonl"

# grad_accum 2 exercises FSDP's deferred gradient sync; 40 steps leave time to stop a run between two checkpoints;
# FSDP computes the loss from full logits (the chunked fused loss needs the unsharded head), so the reference does too
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=32, batch_size=4, grad_accum=2,
            max_steps=40, warmup_steps=2, eval_every=10, eval_windows=2, checkpoint_every=5, keep_checkpoints=10,
            lr=1e-2, threads=1, fused_loss=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One registry for the module's runs (the per-test LMFORGE_HOME does not reach module fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("home")
        mp.setenv("LMFORGE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def tokenized(pydoc_tokenized, home):
    return pydoc_tokenized


def torchrun(tokenized: Path, out: Path, **kw) -> list[str]:
    args = ["pretrain", "--tokenizer", str(tokenized), "--out", str(out), "--parallel", "fsdp"]
    for k, v in {**TINY, **kw}.items():
        flag = f"--{k.replace('_', '-')}"
        args += ([flag if v else f"--no-{flag[2:]}"] if isinstance(v, bool) else [flag, str(v)])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lmforge.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), **TINY), out)
    return out


@pytest.fixture(scope="module")
def fsdp(tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = subprocess.run(torchrun(tokenized, out), capture_output=True, text=True, timeout=180, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 x CPU" in proc.stderr and "(FSDP)" in proc.stderr  # sharded, not DDP
    return out


def tiny_llama(cfg: pretrain.Config, tokenized: Path) -> Llama:
    index = read_index(tokenized / "tokens")
    return Llama(pretrain.model_config(cfg, index["vocab_size"], index["eos_id"]))


def assert_same_weights(a: Path, b: Path, rel: float = WEIGHTS_REL) -> None:
    """Equal up to fp32 reordering (FSDP reduces norms and gradients in another order): see tests/parity.py."""
    assert_weights_match(load_file(str(a)), load_file(str(b)), rel)


def test_fsdp_two_cpu_processes_equal_one_process(single, fsdp):
    m = read_manifest(fsdp)
    assert m.status == "done" and m.metrics["world_size"] == 2
    a, b = records(single), records(fsdp)
    assert [r["step"] for r in b] == list(range(1, 41))  # rank 0 alone wrote metrics
    assert_curves_match(a, b)  # grad norms clipped on DTensor grads: reduced in another order
    assert sum("val_loss" in r for r in b) == 4
    assert_same_weights(single / "checkpoints" / "step-000010" / "model.safetensors",
                        fsdp / "checkpoints" / "step-000010" / "model.safetensors")
    assert_same_weights(single / "model.safetensors", fsdp / "model.safetensors", LATE_WEIGHTS_REL)
    assert json.loads((fsdp / "config.json").read_text()) == json.loads((single / "config.json").read_text())


def test_fsdp_checkpoints_have_the_single_process_format(single, fsdp, tokenized):
    ckpt_a, ckpt_b = single / "checkpoints" / "step-000010", fsdp / "checkpoints" / "step-000010"
    assert_same_weights(ckpt_a / "model.safetensors", ckpt_b / "model.safetensors")
    oa = torch.load(ckpt_a / "optimizer.pt", weights_only=True)
    ob = torch.load(ckpt_b / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys() and "model.layers.1.mlp.up_proj.weight" in ob["state"]
    assert oa["param_groups"] == ob["param_groups"]
    for k in ("exp_avg", "exp_avg_sq"):  # gradient statistics: relative to the gradients, not the weights
        assert_weights_match({n: st[k] for n, st in oa["state"].items()}, {n: st[k] for n, st in ob["state"].items()},
                             LATE_WEIGHTS_REL)
    # the FSDP checkpoint resumes in a single process
    cfg = pretrain.Config(tokenizer=str(tokenized), **TINY)
    model = tiny_llama(cfg, tokenized)
    opt = pretrain.make_optimizer(model, cfg)
    assert load_checkpoint(ckpt_b, model, opt)["step"] == 10
    assert opt.state[model.model.embed_tokens.weight]["exp_avg"].abs().sum() > 0
    assert_weights_match({"w": load_file(str(ckpt_a / "model.safetensors"))["model.embed_tokens.weight"]},
                         {"w": model.lm_head.weight.detach()})


def test_fsdp_run_stopped_and_resumed_equals_uninterrupted(tokenized, fsdp, tmp_path):
    stopped = tmp_path / "stopped"
    cmd = torchrun(tokenized, stopped)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 120
    while not (stopped / "checkpoints" / "step-000005").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what a preempted job gets: torchrun stops its workers
    proc.wait(timeout=60)
    assert read_manifest(stopped).status in ("running", "failed", "interrupted")  # stopped mid-run
    assert not (stopped / "model.safetensors").exists()
    done_before = max(r["step"] for r in records(stopped))
    assert done_before < 40

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = records(fsdp), records(stopped)
    assert [r["step"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-5)
        assert rb.get("val_loss", 0) == pytest.approx(ra.get("val_loss", 0), rel=1e-5)
    assert_same_weights(fsdp / "model.safetensors", stopped / "model.safetensors")


def test_fsdp_with_activation_checkpointing_equals_one_process(tokenized, tmp_path):
    """Checkpointed layers recompute inside FSDP's gathered parameters in the backward pass."""
    kw = dict(max_steps=4, eval_every=4, checkpoint_every=4, activation_checkpointing=True)
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), **{**TINY, **kw}), tmp_path / "single")
    proc = subprocess.run(torchrun(tokenized, tmp_path / "fsdp", **kw), capture_output=True, text=True, timeout=180,
                          env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_curves_match(records(tmp_path / "single"), records(tmp_path / "fsdp"))
    assert_same_weights(tmp_path / "single" / "model.safetensors", tmp_path / "fsdp" / "model.safetensors")


def test_fsdp_in_one_process_trains_unsharded(single, tokenized, tmp_path, capsys):
    out = tmp_path / "one"
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), parallel="fsdp", **TINY), out)
    assert "parallel=fsdp in a single process: training unsharded" in capsys.readouterr().err
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_from_before_fsdp_still_resume(single, tokenized, tmp_path):
    """Older checkpoints hold ``optimizer.state_dict()`` keyed by parameter index; they load as before."""
    cfg = pretrain.Config(tokenizer=str(tokenized), **TINY)
    ref = tiny_llama(cfg, tokenized)
    ref_opt = pretrain.make_optimizer(ref, cfg)
    load_checkpoint(single / "checkpoints" / "step-000010", ref, ref_opt)
    old = tmp_path / "step-000010"
    old.mkdir()
    for name in ("model.safetensors", "state.json"):
        (old / name).write_bytes((single / "checkpoints" / "step-000010" / name).read_bytes())
    torch.save(ref_opt.state_dict(), old / "optimizer.pt")
    assert isinstance(next(iter(torch.load(old / "optimizer.pt")["state"])), int)

    model = Llama(ref.config)
    opt = pretrain.make_optimizer(model, cfg)
    assert load_checkpoint(old, model, opt)["step"] == 10
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(ref_opt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])


SFT = dict(on_error="skip", seq_len=128, batch_size=4, grad_accum=2, max_steps=6, lr=3e-3, warmup_steps=2,
           eval_every=3, checkpoint_every=3, val_fraction=0.05, seed=0, threads=1)


def test_sft_fsdp_two_cpu_processes_equal_one_process(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(l + "\n" for l in CHAT.read_text().splitlines()[:240]))
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    single = tmp_path / "single"
    sft.run(sft.Config(model=str(tiny_model_dir), data=str(data), **SFT), single)

    sharded = tmp_path / "fsdp"
    args = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(sharded), "--parallel", "fsdp"]
    for k, v in SFT.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lmforge.cli", *args], capture_output=True, text=True, timeout=180,
                          env={**env(), "LMFORGE_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP over 2 processes" in proc.stderr
    assert read_manifest(sharded).metrics["world_size"] == 2
    a, b = records(single), records(sharded)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert_curves_match(a, b)  # val_loss: all ranks ran it
    assert sum("val_loss" in r for r in b) == 2
    assert_same_weights(single / "model.safetensors", sharded / "model.safetensors")
    assert_same_weights(single / "checkpoints" / "step-000003" / "trainable.safetensors",
                        sharded / "checkpoints" / "step-000003" / "trainable.safetensors")


def test_sft_fsdp_refuses_lora(tiny_model_dir, tmp_path):
    cfg = sft.Config(model=str(tiny_model_dir), data=str(CHAT), lora_r=4, parallel="fsdp", **SFT)
    with pytest.raises(ConfigError, match="parallel: fsdp shards full fine-tuning"):
        sft.run(cfg, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
