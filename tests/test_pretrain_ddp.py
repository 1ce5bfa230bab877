"""Processes for real: DDP over 2 CPU processes (torchrun, gloo) equals one process; a run killed with SIGKILL and
resumed equals an uninterrupted run bit for bit.

"Equals" is exact, by construction rather than by a tolerance: a 2-process step and a 1-process step with
``grad_accum=2`` train on the same rows in the same micro-batch grouping (``distributed.micro_rows``), so each micro-batch
gradient is the same computation; DDP's 1/2 scaling and the loop's ``loss / grad_accum`` are exact powers of two, and
the two-operand sum of the all-reduce is the same sum as gradient accumulation.  Any difference is a real bug, on every
machine.  (A plain ``grad_accum=1`` single process differs from both in the last bits: a batch of 4 rows sums its
gradient in another order than two batches of 2.)"""

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


def assert_same_run(single: Path, ddp: Path) -> None:
    a, b = records(single), records(ddp)
    keys = ("step", "loss", "grad_norm", "val_loss", "lr", "tokens")
    assert [[r.get(k) for k in keys] for r in b] == [[r.get(k) for k in keys] for r in a]
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_ddp_two_cpu_processes_equal_one_process(tokenized, tmp_path):
    single = tmp_path / "single"  # the same 4 rows per step, as 2 accumulated micro-batches of 2
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), **{**TINY, "batch_size": 2, "grad_accum": 2}), single)

    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", *cli_args(tokenized, ddp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    m = read_manifest(ddp)
    assert m.status == "done" and m.metrics["world_size"] == 2
    assert [r["step"] for r in records(ddp)] == list(range(1, 13))  # rank 0 alone wrote metrics: no duplicated lines
    assert_same_run(single, ddp)
    # the global batch is split across the ranks, so it must divide evenly
    bad = subprocess.run([*cmd[:-len(cli_args(tokenized, ddp))], *cli_args(tokenized, tmp_path / "odd", batch_size=3)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "batch_size: 3 is not a multiple of the 2 processes" in bad.stderr + bad.stdout


def test_ddp_with_an_untied_head_and_the_fused_loss_equals_one_process(tokenized, tmp_path):
    """The fused loss applies lm_head.weight outside DDP's forward; an untied head must still get its gradient
    averaged over the ranks."""
    kw = dict(max_steps=4, eval_every=4, checkpoint_every=4)
    single = tmp_path / "single"
    pretrain.run(pretrain.Config(tokenizer=str(tokenized), tie_embeddings=False,
                                 **{**TINY, **kw, "batch_size": 2, "grad_accum": 2}), single)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", *cli_args(tokenized, ddp, **kw), "--no-tie-embeddings", "--fused-loss"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lm_head.weight" in load_file(str(single / "model.safetensors"))
    assert_same_run(single, ddp)


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
