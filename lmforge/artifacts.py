"""Artifact folders: one folder per stage run, described by a ``manifest.json``.

A manifest says what ran (stage, stage version, resolved config), on what (inputs with fingerprints), what came out
(outputs, metrics) and how it went (status, timings).  The *fingerprint* of a run is a hash of the stage version, the
config and the identities of its inputs; ``lmforge run`` skips a stage whose folder already holds a ``done`` manifest
with the same fingerprint.

The identity of an input that is itself an artifact is its manifest's ``run_id``: when an upstream stage is re-run,
everything downstream of it is re-run too (make-like).  The identity of a raw input (a file, a folder, a glob) is a
hash of its content.

Every file is written to a temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import signal
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from lmforge import __version__

MANIFEST = "manifest.json"


def heartbeat_seconds() -> float:
    """How often a running stage stamps ``heartbeat_at`` in its manifest and the registry (``LMFORGE_HEARTBEAT_S``)."""
    return float(os.environ.get("LMFORGE_HEARTBEAT_S", "30"))


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when a running stage's process gets SIGTERM (Ctrl-C raises KeyboardInterrupt): the
    run ends ``interrupted``, its partial state kept for a resume."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------------------
# atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# fingerprints


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _hash_file(path: Path, h: "hashlib._Hash") -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def expand_paths(spec: str | os.PathLike) -> list[Path]:
    """A path, a folder (all files below it, recursively) or a glob, as a sorted list of files."""
    spec = str(spec)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    else:
        matches = [Path(spec)]
    files: list[Path] = []
    for m in matches:
        if m.is_dir():
            files.extend(sorted(p for p in m.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif m.exists():
            files.append(m)
    return files


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def fingerprint_input(spec: str | os.PathLike) -> str:
    """Identity of an input: the run id of an artifact folder, else a content hash of the files it names."""
    path = Path(spec)
    if is_artifact(path):
        m = read_manifest(path)
        if m.status != "done":
            raise ValueError(f"{path} is an unfinished artifact (status {m.status}); run its stage first")
        return f"run:{m.run_id}"
    files = expand_paths(spec)
    if not files:
        raise FileNotFoundError(f"input {spec} matches no file")
    h = hashlib.sha256()
    base = path if path.is_dir() else None
    for f in files:
        h.update(os.fsencode(f.relative_to(base) if base else f.name))  # names need not be UTF-8
        _hash_file(f, h)
    return "sha256:" + h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# manifests


class InputRef(BaseModel):
    path: str
    fingerprint: str


class Manifest(BaseModel):
    stage: str
    stage_version: str
    fingerprint: str
    run_id: str
    status: str  # running / done / failed / interrupted
    config: dict[str, Any]
    inputs: dict[str, InputRef] = {}
    outputs: list[str] = []
    metrics: dict[str, Any] = {}
    started_at: float
    finished_at: float | None = None
    duration_s: float | None = None
    lmforge_version: str = __version__
    host: dict[str, str] = {}
    error: str | None = None
    pid: int | None = None  # the process that runs (ran) it, on host["node"]
    heartbeat_at: float | None = None  # refreshed every heartbeat_seconds() while running
    resumes: str | None = None  # run id of the unfinished run in this folder that this run continues


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = Path(folder) / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not an lmforge artifact (no {MANIFEST})") from None


def compute_fingerprint(stage: str, stage_version: str, config: dict[str, Any], inputs: dict[str, InputRef]) -> str:
    return hash_json(
        {
            "stage": stage,
            "version": stage_version,
            "config": config,
            "inputs": {k: v.fingerprint for k, v in sorted(inputs.items())},
        }
    )


class StageRun:
    """One run of a stage writing one artifact folder.

    Usage::

        run = StageRun("tokenizer", "1", out_dir, config.model_dump(), inputs={"data": data_dir})
        if run.up_to_date():
            ...  # skip
        with run:
            ...  # write files into run.dir, fill run.metrics
    """

    def __init__(
        self,
        stage: str,
        stage_version: str,
        out_dir: str | os.PathLike,
        config: dict[str, Any],
        inputs: dict[str, str | os.PathLike | InputRef] | None = None,
        execution_fields: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """``execution_fields``: config keys that change how a run executes but not what it produces (worker counts,
        thread counts); they are recorded in the manifest but left out of the fingerprint."""
        self.stage = stage
        self.stage_version = stage_version
        self.dir = Path(out_dir)
        from lmforge.storage import origin, to_origins

        # a local copy of a remote input is recorded as its URL (lmforge.storage), in the config and the inputs
        self.config = json.loads(json.dumps(to_origins(config), default=str))
        self.inputs = {  # an InputRef is taken as it is (a stage that knows its input's identity, e.g. a run id)
            name: p if isinstance(p, InputRef) else
            InputRef(path=origin(p) or (str(Path(p).resolve()) if not any(c in str(p) for c in "*?[") else str(p)),
                     fingerprint=fingerprint_input(p))
            for name, p in (inputs or {}).items()
        }
        produced_by = {k: v for k, v in self.config.items() if k not in execution_fields}
        self.fingerprint = compute_fingerprint(stage, stage_version, produced_by, self.inputs)
        self.run_id = uuid.uuid4().hex[:12]
        self.metrics: dict[str, Any] = {}
        self.outputs: list[str] = []
        self.resumes: str | None = None  # set by the stage (stages.begin) when it continues an unfinished run
        self._started = 0.0
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._beat: threading.Thread | None = None
        self._sigterm: Any = None

    # -- state of an existing folder ----------------------------------------------------------------------------------
    def previous(self) -> Manifest | None:
        try:
            return read_manifest(self.dir)
        except (FileNotFoundError, ValueError):
            return None

    def up_to_date(self) -> bool:
        """True when the folder holds a finished run with the same fingerprint."""
        prev = self.previous()
        return prev is not None and prev.status == "done" and prev.fingerprint == self.fingerprint

    def resumable(self) -> bool:
        """True when the folder holds an unfinished (crashed, killed or interrupted) run of the same fingerprint."""
        prev = self.previous()
        return (prev is not None and prev.status in ("running", "failed", "interrupted")
                and prev.fingerprint == self.fingerprint)

    # -- running ------------------------------------------------------------------------------------------------------
    def _manifest(self, status: str, error: str | None = None) -> Manifest:
        now = time.time()
        done = status != "running"
        return Manifest(
            stage=self.stage,
            stage_version=self.stage_version,
            fingerprint=self.fingerprint,
            run_id=self.run_id,
            status=status,
            config=self.config,
            inputs=self.inputs,
            outputs=sorted(self.outputs),
            metrics=self.metrics if done else {},
            started_at=self._started,
            finished_at=now if done else None,
            duration_s=round(now - self._started, 3) if done else None,
            host={"python": platform.python_version(), "machine": platform.machine(), "node": platform.node()},
            error=error,
            pid=os.getpid(),
            heartbeat_at=now,
            resumes=self.resumes,
        )

    def _heartbeat(self) -> None:
        """Daemon thread: stamp the running manifest and the registry row until the run ends."""
        from lmforge import registry

        while not self._ended.wait(heartbeat_seconds()):
            with self._lock:
                if self._ended.is_set():
                    return
                try:
                    m = self._manifest("running")
                    write_json(self.dir / MANIFEST, m.model_dump())
                    registry.heartbeat(self.run_id, m.heartbeat_at or time.time())
                except Exception:  # a missed beat only makes the run look stale sooner; never stop the stage
                    pass

    def __enter__(self) -> "StageRun":
        from lmforge import registry

        self.dir.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        write_json(self.dir / MANIFEST, self._manifest("running").model_dump())
        registry.record_start(self)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._sigterm = signal.signal(signal.SIGTERM, _raise_interrupted)
        self._beat = threading.Thread(target=self._heartbeat, name=f"lmforge-heartbeat-{self.run_id}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from lmforge import registry
        from lmforge.progress import console

        with self._lock:
            self._ended.set()
            if exc is None:
                if not self.outputs:
                    self.outputs = sorted(
                        str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file() and p.name != MANIFEST
                    )
                manifest = self._manifest("done")
            elif isinstance(exc, KeyboardInterrupt):  # Ctrl-C (SIGINT), or SIGTERM through Interrupted
                manifest = self._manifest("interrupted", error=str(exc) or "stopped by SIGINT (Ctrl-C)")
            else:
                detail = "".join(traceback.format_exception_only(exc_type, exc)).strip()
                manifest = self._manifest("failed", error=detail)
            write_json(self.dir / MANIFEST, manifest.model_dump())
            registry.record_finish(self, manifest)
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if manifest.status == "interrupted":
            console.print(f"[yellow]⏹ {self.stage}[/]: interrupted ({manifest.error}); run {self.run_id} in "
                          f"{self.dir.resolve()} is kept: re-run the same command to resume")
        return False


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)
