"""The data stage on a real Ray cluster (a head and a second node process on loopback, started and stopped here):
the same output as the local executor with every switch on (Ray running the pipeline list the switches expand to), a killed worker retried without loss or duplication,
a shard whose worker keeps dying reported while the others finish (and resumed by a re-run), and an unreachable
address refused in seconds."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmforge.data.steps import Step

from test_data import DEMO, check_conservation

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
INPUTS = [str(DEMO / "jsonl"), str(DEMO / "warc"), str(DEMO / "broken"), str(DEMO / "books" / "kjv-ruth.txt"),
          str(DEMO / "books" / "kjv-jonah.txt"), str(DEMO / "html" / "faq")]
SWITCHES = ["--shards", "3", "--line-junk", "--c4-quality", "--fineweb-quality", "--pii", "--domains",
            "--toxicity", "--line-dedup", "--line-dedup-max-docs", "3", "--minhash", "--minhash-threshold", "0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "RAY_AUTH_MODE": "disabled"}  # a loopback test cluster; Ray's token auth is for real clusters


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process is a driver too
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    logs = open(Path(temp) / "nodes.log", "w")
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp}", *common], env=_env(), stdout=logs, stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs = [head]
    try:
        deadline = time.time() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {(Path(temp) / 'nodes.log').read_text()[-2000:]}")
                time.sleep(0.5)
        procs.append(subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{port}", *common], env=_env(),
                                      stdout=logs, stderr=subprocess.STDOUT, start_new_session=True))
        address = f"127.0.0.1:{port}"
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        while sum(n["Alive"] for n in ray.nodes()) < 2:  # both nodes joined
            if time.time() > deadline:
                raise RuntimeError("the second Ray node did not join")
            time.sleep(0.5)
        ray.shutdown()
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(procs):
            _stop(p)
        logs.close()


def _lmforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=900)


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for sub in ("docs", "dropped") for f in sorted((out / sub).iterdir())}


def _counts(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    for st in stats["steps"]:
        st.pop("seconds", None)
        st.pop("us_per_doc", None)
    return {k: stats[k] for k in ("read", "steps", "totals", "dropped_by_reason", "profile", "examples")}


def test_ray_executor_output_equals_local_with_every_switch_on(cluster, tmp_path):
    """Local with the flat switches (selection and mixing too), Ray with the pipeline list they expand to."""
    import yaml

    flat = {"inputs": INPUTS, "top_fraction": 0.8, "select_score": "lang_score", "mix_by": "lang",
            "mix_targets": {"en": 0.7, "*": 0.3}}
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump(flat))
    args = ["data", "run", "-c", str(tmp_path / "flat.yaml"), *SWITCHES]
    shown = _lmforge("data", "pipeline", "-c", str(tmp_path / "flat.yaml"), *SWITCHES)
    assert shown.returncode == 0, shown.stderr[-3000:]
    listed = {"inputs": INPUTS, "shards": 3, **yaml.safe_load(shown.stdout)}
    (tmp_path / "list.yaml").write_text(yaml.safe_dump(listed))
    local = _lmforge(*args, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    dist = _lmforge("data", "run", "-c", str(tmp_path / "list.yaml"), "--out", str(tmp_path / "ray"),
                    "--executor", "ray", "--ray-address", cluster)
    assert dist.returncode == 0, dist.stderr[-3000:]
    names = [s["name"] for s in check_conservation(tmp_path / "ray")["steps"]]
    for step in ("line_junk_v1", "c4_quality_v2", "fineweb_quality_v2", "toxicity_v1", "pii_redact_v1",
                 "domain_tag_v1", "line_dedup_v1", "exact_dedup_v1", "minhash_dedup_v1", "select_v1", "mix_v1"):
        assert step in names
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")  # byte-identical shards, kept and dropped
    assert _counts(tmp_path / "ray") == _counts(tmp_path / "local")
    ray_stats = json.loads((tmp_path / "ray" / "stats.json").read_text())
    assert ray_stats["totals"]["docs_kept"] > 0 and ray_stats["dropped_by_reason"].get("exact_duplicate", 0) > 0
    assert ray_stats["dropped_by_reason"].get("select_low", 0) > 0
    # the executor is how, not what: switching it does not make the run stale
    again = _lmforge("data", "run", "-c", str(tmp_path / "list.yaml"), "--out", str(tmp_path / "ray"))
    assert again.returncode == 0 and "up to date" in (again.stdout + again.stderr).lower(), again.stdout + again.stderr


class _KillWorker(Step):
    """A pass-through step that SIGKILLs its own worker process: once overall (``once`` set; the first worker to
    create the marker file dies), or every time it sees a document from ``source``."""

    name = "kill_worker_v0"

    def __init__(self, marker: str, once: bool, source: str = "") -> None:
        super().__init__()
        self.marker, self.once, self.source = marker, once, source

    def process(self, doc):
        if self.once:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return doc
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.source and self.source in str(doc.meta.get("source", "")) and not os.path.exists(self.marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return doc


def _steps(cfg: dict, marker: str, once: bool, source: str = "") -> list[Step]:
    from lmforge.data.stage import build_steps

    return build_steps(cfg) + [_KillWorker(marker, once, source)]


def _execute(out: Path, make_steps, executor: str, address: str | None):
    from lmforge.data.executor import execute
    from lmforge.data.readers import read_file
    from lmforge.data.stage import Config, collect_inputs, line_dedup_params, minhash_params

    cfg = Config(inputs=INPUTS, shards=3, minhash=True, line_dedup=True, line_dedup_max_docs=3)
    files, skipped = collect_inputs(cfg.inputs)
    from lmforge.data.steps import ExactDedup

    return execute(files, out, make_steps=make_steps, reader=functools.partial(read_file, chunk_chars=20_000),
                   dedup=ExactDedup(), shards=3, workers=2, fingerprint="f1", skipped_files=skipped,
                   minhash=minhash_params(cfg), line_dedup=line_dedup_params(cfg), executor=executor,
                   ray_address=address)


@pytest.fixture
def by_value():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_killed_worker_is_retried_and_nothing_is_lost(cluster, tmp_path, by_value):
    from lmforge.data import ray_executor
    from lmforge.data.stage import Config

    cfg = Config(inputs=INPUTS, shards=3, minhash=True, line_dedup=True, line_dedup_max_docs=3).model_dump()
    marker = str(tmp_path / "killed")
    try:
        ray_executor.connect(cluster, 2)
        stats = _execute(tmp_path / "ray", functools.partial(_steps, cfg, marker, True), "ray", cluster)
    finally:
        ray_executor.shutdown()
    assert os.path.exists(marker)  # a worker did die mid-shard
    local = _execute(tmp_path / "local", functools.partial(_steps, cfg, marker, True), "local", None)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert stats["totals"] == local["totals"] and stats["dropped_by_reason"] == local["dropped_by_reason"]
    check_conservation(tmp_path / "ray")


def test_shard_whose_worker_keeps_dying_is_reported_and_resumed(cluster, tmp_path, by_value, monkeypatch):
    from lmforge.data import ray_executor
    from lmforge.data.executor import plan_shards, shard_done
    from lmforge.data.stage import Config, collect_inputs

    monkeypatch.setenv(ray_executor.RETRIES_ENV, "1")
    cfg = Config(inputs=INPUTS, shards=3, minhash=True, line_dedup=True, line_dedup_max_docs=3).model_dump()
    marker = str(tmp_path / "healed")
    make = functools.partial(_steps, cfg, marker, False, "kjv-jonah")
    try:
        ray_executor.connect(cluster, 2)
        with pytest.raises(ray_executor.RayExecutorError) as err:
            _execute(tmp_path / "out", make, "ray", cluster)
        msg = str(err.value)
        shards = plan_shards(collect_inputs(INPUTS)[0], 3)
        bad = next(k for k, fs in enumerate(shards) if any("kjv-jonah" in str(f) for f in fs))
        assert f"1 of 3 shard(s) failed after 1 retries" in msg and f"part-0000{bad} ({len(shards[bad])} files" in msg
        assert "worker died" in msg, msg
        done = [i for i in range(3) if shard_done(tmp_path / "out", i, "f1", True, True)]
        assert len(done) == 2  # the other shards finished and are kept
        Path(marker).touch()  # the cause is fixed: the re-run does only the failed shard
        stats = _execute(tmp_path / "out", make, "ray", cluster)
    finally:
        ray_executor.shutdown()
    assert sum(s["resumed"] for s in stats["shards"]) == 2
    check_conservation(tmp_path / "out")


def test_unreachable_ray_address_is_a_clear_error(tmp_path):
    port = _free_port()
    t0 = time.time()
    r = _lmforge("data", "run", "--inputs", str(DEMO / "jsonl"), "--out", str(tmp_path / "o"), "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}")
    assert r.returncode != 0
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    assert time.time() - t0 < 120  # not Ray's own minutes of retries (a bound on a hang, not a speed target)
