"""What every stage shares: run-or-skip around a ``StageRun``.

A stage module exposes ``STAGE`` (name), ``VERSION`` (bump it when outputs change meaning), a ``Config`` (a
``StageConfig``) and ``run(config, out_dir, force=False) -> Manifest``.  Inside ``run`` a stage calls
``begin(...)``: it returns ``None`` when the folder already holds a finished run with the same fingerprint (and says
so), else a ``StageRun`` to use as a context manager.  When the folder holds an unfinished run of the same
fingerprint (and ``force`` is off) the new run records that it ``resumes`` it; a stage that decides otherwise (starts
afresh, or resumes under ``force``) sets ``run.resumes`` itself before entering the run.
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
    inputs: dict[str, str | os.PathLike] | None = None,
    force: bool = False,
    execution_fields: frozenset[str] | set[str] = frozenset(),
) -> StageRun | None:
    run = StageRun(stage, version, out_dir, config, inputs, execution_fields)
    if not force and run.up_to_date():
        console.print(f"[green]✓ {stage}[/]: up to date in {out_dir} (fingerprint {run.fingerprint}), skipped")
        return None
    if run.resumable() and not force:
        prev = run.previous()
        run.resumes = prev.run_id if prev else None
        console.print(f"[yellow]↻ {stage}[/]: resuming the unfinished run {run.resumes} in {out_dir}")
    else:
        console.print(f"[bold]▶ {stage}[/] → {out_dir}")
    return run


def finished(out_dir: str | os.PathLike) -> Manifest:
    return read_manifest(out_dir)
