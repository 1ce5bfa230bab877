"""Processes for real: DDP over 2 CPU processes (torchrun, gloo) equals one process; a run killed with SIGKILL and
resumed equals an uninterrupted run bit for bit."""

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

from lmforge.artifacts import read_manifest
from lmforge.train import pretrain

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=32, batch_size=4, max_steps=12,
            warmup_steps=2, eval_every=4, eval_windows=2, checkpoint_every=4, lr=1e-2, threads=1)


@pytest.fixture(scope="module")
def tokenized(pydoc_tokenized):
    return pydoc_tokenized


def cli_args(tokenized: Path, out: Path, **kw) -> list[str]:
    args = ["pretrain", "--tokenizer", str(tokenized), "--out", str(out)]
    for k, v in {**TINY, **kw}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_cpu_processes_equal_one_process(tokenized, tmp_path):
    single = tmp_path / "single"
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), **TINY), single)

    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", *cli_args(tokenized, ddp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    m = read_manifest(ddp)
    assert m.status == "done" and m.metrics["world_size"] == 2
    a, b = records(single), records(ddp)
    assert [r["step"] for r in b] == list(range(1, 13))  # rank 0 alone wrote metrics: no duplicated lines
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-4)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3, abs=1e-4)
        assert rb.get("val_loss", 0) == pytest.approx(ra.get("val_loss", 0), rel=1e-4)
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # the global batch is split across the ranks, so it must divide evenly
    bad = subprocess.run([*cmd[:-len(cli_args(tokenized, ddp))], *cli_args(tokenized, tmp_path / "odd", batch_size=3)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "batch_size: 3 is not a multiple of the 2 processes" in bad.stderr + bad.stdout


def test_ddp_with_an_untied_head_and_the_fused_loss_equals_one_process(tokenized, tmp_path):
    """The fused loss applies lm_head.weight outside DDP's forward; an untied head must still get its gradient
    averaged over the ranks."""
    kw = dict(max_steps=4, eval_every=4, checkpoint_every=4)
    single = tmp_path / "single"
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), tie_embeddings=False, **{**TINY, **kw}), single)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", *cli_args(tokenized, ddp, **kw), "--no-tie-embeddings", "--fused-loss"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ra, rb in zip(records(single), records(ddp), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-4)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3, abs=1e-4)
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert "lm_head.weight" in wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_sigkill_and_resume_is_bit_exact(tokenized, tmp_path):
    kw = dict(max_steps=60, checkpoint_every=5, eval_every=10)
    straight = tmp_path / "straight"
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), **{**TINY, **kw}), straight)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *cli_args(tokenized, killed, **kw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "checkpoints" / "step-000010").exists():  # at least two checkpoints in
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(killed).status == "running"  # killed mid-run: nothing got to clean up
    assert not (killed / "model.safetensors").exists()

    pretrain.run(pretrain.Config(tokenizer=str(tokenized), **{**TINY, **kw}), killed)
    a, b = records(straight), records(killed)
    assert [r["step"] for r in b] == list(range(1, 61))
    assert [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in a] == \
           [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in b]
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
