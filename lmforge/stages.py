"""What every stage shares: run-or-skip around a ``StageRun``.

A stage module exposes ``STAGE`` (name), ``VERSION`` (bump it when outputs change meaning), a ``Config`` (a
``StageConfig``) and ``run(config, out_dir, force=False) -> Manifest``.  Inside ``run`` a stage calls
``begin(...)``: it returns ``None`` when the folder already holds a finished run with the same fingerprint (and says
so), else a ``StageRun`` to use as a context manager.  When the folder holds an unfinished run of the same
fingerprint (and ``force`` is off) the new run records that it ``resumes`` it.  A stage that keeps its partial state
(checkpoints, finished tasks) even under ``force`` passes ``force_resumes=True``: then a forced re-run of an unfinished
folder is recorded as the resume it is.  The decision is ``run.resumes is not None``: stages read it there instead of
deciding again.  A stage that decides otherwise (pretraining on a changed config) sets ``run.resumes`` itself before
entering the run.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from typing import Any, Iterator

from lmforge.artifacts import Manifest, StageRun, read_manifest
from lmforge.progress import console


_OVERWRITE = contextvars.ContextVar("lmforge_overwrite", default=False)


@contextmanager
def overwrite_allowed() -> Iterator[None]:
    """Within this block, stages that refuse to overwrite a finished run with a different config (pretraining) do
    overwrite it: the recipe runner uses it, because a recipe re-runs changed stages by design."""
    token = _OVERWRITE.set(True)
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def overwrite_is_allowed() -> bool:
    return _OVERWRITE.get()


def begin(
    stage: str,
    version: str,
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    inputs: dict[str, Any] | None = None,  # paths, or InputRefs a stage computed itself
    force: bool = False,
    execution_fields: frozenset[str] | set[str] = frozenset(),
    force_resumes: bool = False,
) -> StageRun | None:
    """The run to enter, or None when the folder is up to date (see the module docstring)."""
    run = StageRun(stage, version, out_dir, config, inputs, execution_fields)
    _refuse_if_busy(run, out_dir)
    if not force and run.up_to_date():
        console.print(f"[green]✓ {stage}[/]: up to date in {out_dir} (fingerprint {run.fingerprint}), skipped")
        return None
    if run.resumable() and (not force or force_resumes):
        prev = run.previous()
        run.resumes = prev.run_id if prev else None
        console.print(f"[yellow]↻ {stage}[/]: resuming the unfinished run {run.resumes} in {out_dir}")
    else:
        console.print(f"[bold]▶ {stage}[/] → {out_dir}")
    return run


class BusyFolderError(ValueError):
    """The output folder is being written by another live run."""


def _refuse_if_busy(run: StageRun, out_dir: str | os.PathLike) -> None:
    """Two processes writing one folder would mix their outputs: refuse while another live run holds it."""
    from lmforge.registry import process_state

    prev = run.previous()
    if prev is None or prev.status != "running" or prev.pid is None or prev.pid == os.getpid():
        return
    state = process_state(prev.pid, prev.host.get("node"), prev.heartbeat_at, prev.started_at)
    if state.startswith("running"):
        raise BusyFolderError(f"{out_dir} is being written by run {prev.run_id} ({prev.stage}, pid {prev.pid} on "
                              f"{prev.host.get('node')}, {state}); wait for it, stop it, or choose another --out")


def finished(out_dir: str | os.PathLike) -> Manifest:
    return read_manifest(out_dir)
