"""The training core every loop uses (pretrain, sft, dpo, reward; grpo next): the loop owns the step, these are the
parts it is made of (the torchtitan idea).  A loop keeps only its data, its batching and its loss.

Stable API (other loops build on it; change it only compatibly):

* ``make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8) -> AdamW`` — AdamW (fused kernel) over
  the *trainable* parameters, weight decay on matrices (2-D and more) only.
* ``set_lr(opt, lr)`` and ``lr_at(...)`` (re-exported from ``train/schedule.py``): warmup + cosine or WSD schedule,
  a pure function of the step, so a resumed run has the same learning rates.
* ``step(opt, params, micro_batches, loss_of, *, grad_clip, at_step, world=World(), ddp=None, hint="") ->
  StepResult`` — one optimizer step: for each micro-batch ``loss_of(micro)`` returns the tensor to back-propagate
  (already scaled the way the loop wants, e.g. ``/ grad_accum``), or ``(tensor, stats_dict)``; gradients are
  synchronised over data-parallel ranks only on the last micro-batch (``ddp`` is the DDP/FSDP wrapper, or None);
  the summed loss is averaged over ranks and checked finite (``FloatingPointError`` naming the step and the learning
  rate), then gradients are clipped (``grad_clip`` 0 = no clip, the norm is still measured), the optimizer steps and
  gradients are cleared.  ``StepResult(loss, grad_norm, stats)``: ``stats`` lists each micro-batch's dict.
* ``check_finite(loss, at_step, hint)`` — the finite-loss check alone.
* ``MetricsLog(out, world, tensorboard, resume_step)`` — ``metrics.jsonl`` (+ TensorBoard events under
  ``tensorboard/``) on rank 0, nothing elsewhere; on resume, records logged after the checkpoint are dropped (they
  are logged again).  ``log(record)`` takes ``{"step": n, ...}``; keys ``val_x`` go to ``val/x``, others to
  ``train/x``.  ``close()``; also a context manager.
* ``TrainableCheckpoints(root, keep, world)`` — checkpoints of the trainable tensors (LoRA adapters, or every
  parameter of full fine-tuning) + optimizer state + RNG + a loop's own ``state`` dict (data position, ...):
  ``save(step, model, opt, state=None)`` (every rank calls it, rank 0 writes, atomically), ``load(model, opt) ->
  (step, state)`` (``(0, {})`` when there is none), ``exists()``.  Pretraining keeps ``train/checkpoint.py``'s full
  checkpoints (the same ``step-NNNNNN`` layout).
* ``run_stage(out, device, plan, train, check=None) -> Manifest`` — the rank-0 manifest logic of a stage that may run
  under ``torchrun``: ``plan()`` (rank 0 only) returns a ``StageRun`` or None (up to date: skip) or raises
  ``ConfigError``; the decision is broadcast, every rank calls ``train(world) -> metrics``; rank 0 records the run and
  its metrics.  ``check(world)`` runs on every rank first (config errors every rank raises alike).
* ``clear_stale(out, names)`` — a fresh (not resumed) run starts from an empty folder.
* ``checkpointing_on(cfg)`` — activation checkpointing as configured, else on for LoRA.
* ``peak_rss_mb()``, ``NoBar`` (the progress bar's stand-in on ranks other than 0), ``bar_for(world)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.artifacts import Manifest
from lmforge.config import ConfigError
from lmforge.progress import console, progress
from lmforge.stages import begin, finished
from lmforge.train import distributed
from lmforge.train.distributed import World
from lmforge.train.schedule import lr_at

__all__ = ["make_optimizer", "set_lr", "lr_at", "step", "StepResult", "check_finite", "MetricsLog",
           "TrainableCheckpoints", "run_stage", "run_local", "clear_stale", "checkpointing_on", "peak_rss_mb", "NoBar", "bar_for"]


# ----------------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices (2-D and more), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA) updates each tensor in one pass instead of a dozen elementwise kernels; it is
    # deterministic, so bit-exact resume holds (tested)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


# ----------------------------------------------------------------------------------------------------------------------
# the step


@dataclass
class StepResult:
    loss: float  # summed over the micro-batches, averaged over ranks
    grad_norm: float  # before clipping
    stats: list[dict[str, Any]] = field(default_factory=list)  # what loss_of returned beside each loss


def check_finite(loss: float, at_step: int, hint: str = "") -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {at_step}; " + (hint or "lower the learning rate"))


def step(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor], micro_batches: Sequence[Any],
         loss_of: Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict[str, Any]]], *, grad_clip: float,
         at_step: int, world: World = World(), ddp: nn.Module | None = None, hint: str = "") -> StepResult:
    """Backward over the micro-batches, finite check, clip, optimizer step, zero grads (see the module docstring)."""
    total, stats = 0.0, []
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with distributed.no_grad_sync(ddp, skip=not last) if ddp is not None else contextlib.nullcontext():
            out = loss_of(micro)
            loss, extra = out if isinstance(out, tuple) else (out, None)
            loss.backward()
        total += float(loss.detach())
        if extra:
            stats.append(extra)
    total = distributed.mean_over_ranks(total, world)
    check_finite(total, at_step, hint)
    params = [p for p in params if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf")))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm, stats)


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def _step_of(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard on rank 0; nothing on other ranks."""

    def __init__(self, out: Path, world: World = World(), tensorboard: bool = False, resume_step: int = 0) -> None:
        self.path = Path(out) / "metrics.jsonl"
        self.file = None
        self.tb = None
        if not world.is_main:
            return
        if resume_step and self.path.exists():  # drop records logged after the checkpoint: they are logged again
            kept = [l for l in self.path.read_text().splitlines() if _step_of(l) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                console.print("[yellow]  tensorboard is not installed: no event files[/]")
            else:
                self.tb = SummaryWriter(str(Path(out) / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log(self, rec: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints of the trainable tensors


class TrainableCheckpoints:
    """``root/step-NNNNNN/{trainable.safetensors, optimizer.pt, state.json}``: the trainable tensors unsharded, the
    optimizer state by parameter name, the torch RNG and the loop's ``state``; written under a temporary name and
    renamed; the newest ``keep`` are kept."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, world: World = World()) -> None:
        self.root, self.keep, self.world = Path(root), keep, world

    def all(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if (p / "state.json").exists())

    def exists(self) -> bool:
        return bool(self.all())

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer,
             state: dict[str, Any] | None = None) -> Path | None:
        """Every rank calls it (under FSDP gathering is a collective); rank 0 writes and gets the folder."""
        sd, optim_sd = distributed.full_state_dicts(model, opt, trainable_only=True)
        if not self.world.is_main:
            return None
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {n: t for n, t in sd.items() if n in trainable}  # no buffers (an int8 base's weights)
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / f"step-{step:06d}", self.root / f".step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({n: t.contiguous() for n, t in sd.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optim_sd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {}),
                                                    "rng_torch": torch.get_rng_state().tolist()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in self.root.glob("step-*") if p.is_dir())[:-self.keep]:
            shutil.rmtree(old)
        return final

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, verbose: bool = True) -> tuple[int, dict[str, Any]]:
        """Restore the newest checkpoint into ``model`` and ``opt`` (and the torch RNG): ``(step, state)``."""
        found = self.all()
        if not found:
            return 0, {}
        sd = load_file(str(found[-1] / "trainable.safetensors"))
        optim_sd = torch.load(found[-1] / "optimizer.pt", weights_only=True)
        if any(isinstance(k, int) for k in optim_sd["state"]):  # written by ``opt.state_dict()`` (before FSDP)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, t in sd.items():
                    params[name].copy_(t)
            opt.load_state_dict(optim_sd)
        else:
            distributed.load_full_state_dicts(model, opt, sd, optim_sd, strict=False)
        state = json.loads((found[-1] / "state.json").read_text())
        torch.set_rng_state(torch.tensor(state.pop("rng_torch"), dtype=torch.uint8))
        step_ = int(state.pop("step"))
        if verbose and self.world.is_main:
            console.print(f"  resumed from {found[-1]} (step {step_})")
        return step_, state


# ----------------------------------------------------------------------------------------------------------------------
# stage plumbing


def clear_stale(out: Path, names: Iterable[str] = ("checkpoints", "metrics.jsonl", "tensorboard")) -> None:
    """Remove a previous run's partial state: a fresh run starts from an empty folder."""
    for name in names:
        p = Path(out) / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def run_stage(out: Path, device: str, plan: Callable[[], Any], train: Callable[[World], dict[str, Any]],
              check: Callable[[World], None] | None = None) -> Manifest:
    """Run a training stage on every rank (one rank without torchrun); rank 0 plans and records (module docstring)."""
    world = distributed.setup(device)
    try:
        if check is not None:
            check(world)  # every rank raises the same error, before any file is touched
        run_, action, message = None, "", None
        if world.is_main:
            try:
                run_ = plan()
                action = "skip" if run_ is None else "train"
            except ConfigError as err:
                action, message = "error", str(err)
        action, message = distributed.broadcast((action, message), world)
        if action == "skip":
            return finished(out)
        if action == "error":
            raise ConfigError(message)
        if world.is_main:
            with run_:
                run_.metrics.update(train(world))
        else:
            train(world)
        distributed.barrier(world)  # rank 0 has written the manifest
        return finished(out)
    finally:
        distributed.teardown(world)


def run_local(stage: str, version: str, out: Path, config: Any, force: bool, stale: Iterable[str],
              train: Callable[[], dict[str, Any]]) -> Manifest:
    """Run a one-process training stage: skip it when up to date, resume it when its checkpoints allow, else clear
    the ``stale`` files of an earlier run and train.  Inputs recorded: ``config.model``, ``config.data`` and, when
    set, ``config.val_data``."""
    inputs = {"model": config.model, "data": config.data}
    if config.val_data:
        inputs["val_data"] = config.val_data
    run_ = begin(stage, version, out, config.model_dump(), inputs=inputs, force=force, force_resumes=True)
    if run_ is None:
        return finished(out)
    with run_:
        if run_.resumes is None:
            clear_stale(out, stale)
        run_.metrics.update(train())
    return finished(out)


def checkpointing_on(cfg: Any) -> bool:
    """Activation checkpointing as asked (``cfg.activation_checkpointing``), else on for LoRA (``cfg.lora_r``)."""
    asked = getattr(cfg, "activation_checkpointing", None)
    return asked if asked is not None else bool(getattr(cfg, "lora_r", None))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NoBar(contextlib.nullcontext):
    """Stands in for the progress bar on ranks other than 0."""

    def __enter__(self) -> "NoBar":
        return self

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


def bar_for(world: World) -> Any:
    """The progress bar on rank 0, a silent stand-in elsewhere."""
    return progress() if world.is_main else NoBar()
