"""`lmforge doctor` and `lmforge doctor --distributed` (a real torchrun with two gloo processes)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from lmforge import doctor

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for k in doctor.ENV_VARS:
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_flags_decide_the_bf16_advice():
    amx = "processor : 0\nmodel name : Xeon\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    old = "processor : 0\nmodel name : Old\nflags : fpu sse2\n"
    by_check = {f.check: f for f in doctor.check_cpu(amx)}
    assert by_check["cpu_flags"].level == "ok" and "bfloat16" in by_check["cpu_flags"].meaning
    assert "Xeon" in by_check["cpu"].found
    slow = {f.check: f for f in doctor.check_cpu(old)}["cpu_flags"]
    assert slow.level == "warn" and "AVX2" in slow.fix


def test_env_checks_name_what_is_wrong_and_the_fix():
    missing = doctor.check_env({})[0]
    assert missing.level == "fail" and "RANK" in missing.found and "torchrun" in missing.fix
    bad = doctor.check_env({"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                            "MASTER_PORT": "29500"})[0]
    assert bad.level == "fail" and "RANK=3" in bad.found
    good = doctor.check_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": "29500"})[0]
    assert good.level == "ok"


def test_unreachable_master_and_unresolvable_host():
    port = _free_port()  # nobody listens there now
    f = doctor.check_master("127.0.0.1", port, rank=1, timeout=1)
    assert f.level == "fail" and str(port) in f.fix and "firewall" in f.meaning
    f = doctor.check_master("no-such-host.invalid", port, rank=1)
    assert f.level == "fail" and "does not resolve" in f.found


def test_doctor_json_reports_every_area():
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "doctor", "--json"], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    checks = {f["check"]: f for f in report["findings"]}
    for key in ("python", "torch", "gpu", "collectives", "cpu", "cpu_flags", "threads", "memory", "disk"):
        assert key in checks, key
    assert "gloo yes" in checks["collectives"]["found"]
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {f"extra:{e}" for e in extras} <= set(checks)
    assert report["status"] == doctor.summary([doctor.Finding(**f) for f in report["findings"]])


def test_distributed_under_torchrun_checks_allreduce_and_measures_bandwidth():
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "lmforge.cli",
                          "doctor", "--distributed", "--json", "--sizes-mb", "0.25,1"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["status"] == "ok" and report["world_size"] == 2
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for r in report["ranks"]:
        checks = {f["check"]: f for f in r["findings"]}
        assert checks["all_reduce"]["level"] == "ok" and "expected 3" in checks["all_reduce"]["found"]
        assert [b["size_mb"] for b in r["bandwidth"]] == [0.25, 1.0]
        assert all(b["ms"] > 0 and b["busbw_gbps"] > 0 for b in r["bandwidth"])


def test_distributed_diagnoses_a_timeout_and_an_unreachable_master():
    port = _free_port()
    base = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # rank 0 alone: the second process never joins
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "doctor", "--distributed", "--json", "--timeout", "2"],
                         env=_env(RANK="0", LOCAL_RANK="0", **base), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    checks = {f["check"]: f for f in json.loads(out.stdout)["findings"]}
    assert checks["rendezvous"]["level"] == "fail" and "timeout" in checks["rendezvous"]["meaning"]
    # rank 1 with nobody listening on the master port (in-process: it stops before any collective)
    result = doctor.run_distributed(env=dict(RANK="1", LOCAL_RANK="0", **base))
    checks = {f.check: f for f in result["findings"]}
    assert checks["master"].level == "fail" and f"port {port}" in checks["master"].fix
    assert "rendezvous" not in checks
    # no torchrun at all
    result = doctor.run_distributed(env={})
    assert result["findings"][0].level == "fail" and "torchrun" in result["findings"][0].fix
