"""Launch: start a stage from a form generated from its ``Config`` model, as a subprocess of the ``lmforge`` CLI.

The form has one field per CLI flag (the same ``_cli_type`` rule ``command_from_config`` uses), so a job is exactly
the command line a user would type; the dashboard shows it.  Each job is a folder ``$LMFORGE_HOME/dashboard-jobs/<id>/``
with ``job.json`` (command, pid, output folder, exit code) and ``output.log``, so jobs survive a browser reload and a
dashboard restart.  Jobs run in their own session: restarting the dashboard does not kill them.  A job whose process
is gone without an exit code recorded is shown ``interrupted`` unless its run finished (manifest ``done``).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmforge.artifacts import write_json
from lmforge.config import _cli_type
from lmforge.dashboard.store import PageError, process_alive


@dataclass(frozen=True)
class StageEntry:
    name: str
    module: str
    command: tuple[str, ...]
    default_out: str


STAGES = {s.name: s for s in (
    StageEntry("data", "lmforge.data.stage", ("data", "run"), "data"),
    StageEntry("tokenizer", "lmforge.tokenizer.stage", ("tokenizer", "train"), "tokenizer"),
    StageEntry("pretrain", "lmforge.train.pretrain", ("pretrain",), "pretrain"),
    StageEntry("sft", "lmforge.align.sft", ("sft",), "sft"),
    StageEntry("dpo", "lmforge.align.dpo", ("dpo",), "dpo"),
    StageEntry("eval", "lmforge.eval.stage", ("eval",), "eval"),
    StageEntry("feedback_export", "lmforge.feedback.export", ("feedback", "export"), "feedback_export"),
)}


def stage(name: str) -> StageEntry:
    if name not in STAGES:
        raise PageError(f"unknown stage {name!r}; one of {', '.join(STAGES)}", 404)
    return STAGES[name]


def form_fields(entry: StageEntry) -> list[dict[str, Any]]:
    """One dict per CLI flag: name, flag, kind (bool/choice/list/number/text), default, choices, help, required."""
    cls = importlib.import_module(entry.module).Config
    out = []
    for name, field in cls.model_fields.items():
        ann = _cli_type(field.annotation)
        if ann is None:
            continue
        literal = _literal_choices(field.annotation)
        origin = typing.get_origin(ann)
        kind = ("bool" if ann is bool else "choice" if literal else "list" if origin is list
                else "number" if ann in (int, float) else "text")
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        out.append({"name": name, "flag": "--" + name.replace("_", "-"), "kind": kind, "choices": literal,
                    "default": ", ".join(map(str, default)) if isinstance(default, list) else default,
                    "help": field.description or "", "required": field.is_required()})
    return out


def _literal_choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return [str(a) for a in typing.get_args(arg)]
    return []


def command_line(entry: StageEntry, values: dict[str, str], out: str) -> list[str]:
    """Validate the form values with the stage's Config and build the CLI command (only fields that were given)."""
    cls = importlib.import_module(entry.module).Config
    fields = {f["name"]: f for f in form_fields(entry)}
    data: dict[str, Any] = {}
    argv = [sys.executable, "-m", "lmforge.cli", *entry.command]
    for name, raw in values.items():
        if name not in fields:
            raise PageError(f"{name}: not a field of the {entry.name} stage", 400)
        f = fields[name]
        raw = raw.strip()
        if raw == "" or (f["kind"] != "bool" and raw == str(f["default"])):
            continue
        if f["kind"] == "bool":
            value = raw.lower() in ("1", "true", "on", "yes")
            if value == f["default"]:
                continue
            data[name] = value
            argv.append(f["flag"] if value else "--no-" + f["flag"][2:])
        elif f["kind"] == "list":
            items = [x.strip() for x in raw.split(",") if x.strip()]
            data[name] = items
            for x in items:
                argv += [f["flag"], x]
        else:
            data[name] = raw
            argv += [f["flag"], raw]
    try:
        cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise PageError(f"the {entry.name} config is not valid: {problems}", 422) from None
    return argv + ["--out", out]


class Jobs:
    def __init__(self, home: Path) -> None:
        self.dir = Path(home) / "dashboard-jobs"
        self.procs: dict[str, subprocess.Popen] = {}  # jobs started by this dashboard process

    def start(self, entry: StageEntry, values: dict[str, str], out: str = "") -> dict[str, Any]:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        out = out.strip() or str(self.dir.parent / f"{entry.default_out}-{job_id}")
        argv = command_line(entry, values, str(Path(out).resolve()))
        folder = self.dir / job_id
        folder.mkdir(parents=True)
        log = open(folder / "output.log", "wb")
        env = dict(os.environ, LMFORGE_HOME=str(self.dir.parent), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        log.close()
        self.procs[job_id] = proc
        job = {"id": job_id, "stage": entry.name, "argv": argv, "out": str(Path(out).resolve()), "pid": proc.pid,
               "started_at": time.time(), "finished_at": None, "exit_code": None, "cancelled": False}
        write_json(folder / "job.json", job)
        return self._derive(job)

    def _load(self, job_id: str) -> dict[str, Any]:
        if "/" in job_id or job_id.startswith("."):
            raise PageError(f"no job {job_id!r}", 404)
        path = self.dir / job_id / "job.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise PageError(f"no job {job_id!r}", 404) from None
        except json.JSONDecodeError as err:
            raise PageError(f"{path} is corrupt: {err}", 500) from None

    def _derive(self, job: dict[str, Any]) -> dict[str, Any]:
        proc = self.procs.get(job["id"])
        if job["exit_code"] is None and proc is not None and proc.poll() is not None:
            job["exit_code"], job["finished_at"] = proc.returncode, time.time()
            write_json(self.dir / job["id"] / "job.json", job)
        if job["exit_code"] is not None:
            job["state"] = "cancelled" if job.get("cancelled") else ("done" if job["exit_code"] == 0 else "failed")
        elif proc is not None or process_alive(job["pid"]):
            job["state"] = "running"
        else:  # gone while no dashboard was watching it: did its run finish?
            try:
                status = json.loads((Path(job["out"]) / "manifest.json").read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                status = None
            job["state"] = "done" if status == "done" else "interrupted"
        job["command"] = " ".join(_quote(a) for a in job["argv"])
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        return self._derive(self._load(job_id))

    def all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        out = []
        for d in sorted(self.dir.iterdir(), reverse=True):
            try:
                out.append(self.get(d.name))
            except PageError:
                continue
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job["state"] != "running":
            raise PageError(f"job {job_id} is not running ({job['state']})", 409)
        try:
            os.killpg(job["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        raw = self._load(job_id)
        raw["cancelled"] = True
        proc = self.procs.get(job_id)
        if proc is not None:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(job["pid"], signal.SIGKILL)
                proc.wait()
            raw["exit_code"], raw["finished_at"] = proc.returncode, time.time()
        else:  # started by an earlier dashboard process: no exit code to collect
            raw["exit_code"], raw["finished_at"] = -int(signal.SIGTERM), time.time()
        write_json(self.dir / job_id / "job.json", raw)
        return self.get(job_id)

    def log_path(self, job_id: str) -> Path:
        self._load(job_id)
        return self.dir / job_id / "output.log"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
