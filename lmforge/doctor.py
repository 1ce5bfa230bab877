"""``lmforge doctor``: what this machine offers lmforge, and what to fix.

Each check yields a :class:`Finding`: what was looked at, what was found, a level (``ok`` / ``info`` / ``warn`` /
``fail``), what it means for lmforge and, when it is not ``ok``, the fix.

    lmforge doctor                     # Python, torch, accelerators, collectives, CPU flags, memory, disk, extras
    lmforge doctor --json              # the same as JSON
    torchrun --nproc_per_node 2 -m lmforge.cli doctor --distributed
                                       # rank/world checks, all-reduce correctness and bandwidth per rank

The distributed check diagnoses the usual failures of a multi-process launch before a training run meets them:
env variables that disagree between processes, a MASTER_ADDR that does not resolve or a port nobody listens on, and a
rendezvous that times out.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

LEVELS = ("ok", "info", "warn", "fail")


@dataclass
class Finding:
    check: str
    level: str  # ok / info / warn / fail
    found: str
    meaning: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# single machine


def check_python() -> Finding:
    v = sys.version_info
    found = f"Python {platform.python_version()} ({sys.executable})"
    if v < (3, 10):
        return Finding("python", "fail", found, "lmforge needs Python 3.10 or newer.",
                       "Create the venv with python3.10+ (make install PYTHON=python3.11).")
    return Finding("python", "ok", found, "Supported.")


def check_torch() -> list[Finding]:
    try:
        import torch
    except ImportError as err:
        return [Finding("torch", "fail", f"not importable ({err})", "Nothing trains, evaluates or serves without it.",
                        "pip install torch==2.13.0 (CPU) or the CUDA build matching your driver.")]
    out = [Finding("torch", "ok", f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
                   "Training, eval and serving run on it.")]
    cuda = torch.cuda.is_available()
    hip = getattr(torch.version, "hip", None)
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        kind = f"ROCm {hip}" if hip else f"CUDA {torch.version.cuda}"
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Finding("gpu", "ok", f"{kind}: {len(names)} device(s): {', '.join(names)}; bf16 {'yes' if bf16 else 'no'}",
                           "`--device auto` trains and serves on the GPU; `--dtype bfloat16` "
                           + ("works." if bf16 else "is not supported: keep float32.")))
    else:
        built = torch.version.cuda or hip
        if built:
            out.append(Finding("gpu", "warn", f"torch built for {'ROCm ' + hip if hip else 'CUDA ' + str(built)} but "
                                              "no device is visible",
                               "Everything runs on the CPU, much slower.",
                               "Check `nvidia-smi` / `rocm-smi`, the driver version and CUDA_VISIBLE_DEVICES."))
        else:
            out.append(Finding("gpu", "info", "no CUDA/ROCm (CPU build of torch)",
                               "Training and serving run on the CPU: fine for the demo and small models.",
                               "For a GPU: install the CUDA build of torch matching your driver (see README)."))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(Finding("mps", "info", "Apple MPS available",
                           "lmforge trains on CPU or CUDA; MPS is not used by its stages yet."))
    import torch.distributed as dist

    if not dist.is_available():
        out.append(Finding("collectives", "fail", "torch.distributed is not available in this build",
                           "torchrun / DDP / FSDP cannot run.", "Install a torch build with distributed support."))
    else:
        gloo = dist.is_gloo_available()
        nccl = dist.is_nccl_available()
        nccl_v = ""
        if nccl and cuda:
            try:
                nccl_v = " " + ".".join(map(str, torch.cuda.nccl.version()))
            except Exception:  # noqa: BLE001 - a missing libnccl shows up here; the finding says so below
                nccl_v = " (version unreadable)"
        found = f"gloo {'yes' if gloo else 'no'}, nccl {'yes' + nccl_v if nccl else 'no'}"
        if not gloo:
            out.append(Finding("collectives", "warn", found, "CPU multi-process training (gloo) is unavailable.",
                               "Install the official torch wheel (it ships gloo)."))
        elif cuda and not nccl:
            out.append(Finding("collectives", "warn", found, "Multi-GPU training falls back to nothing: DDP on GPUs "
                                                               "needs NCCL.", "Install the CUDA build of torch (it ships NCCL)."))
        else:
            out.append(Finding("collectives", "ok", found,
                               "torchrun uses " + ("nccl on GPUs, " if nccl else "") + "gloo on CPUs."))
    return out


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def check_cpu(cpuinfo: str | None = None) -> list[Finding]:
    flags = cpu_flags(cpuinfo)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")),
                 platform.processor() or "unknown model")
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    out = [Finding("cpu", "ok" if usable >= 4 else "info",
                   f"{platform.machine()}, {usable} usable of {cores} logical CPUs ({model})",
                   "Data workers and CPU training threads scale with it." + (" Few cores: keep models tiny." if usable < 4 else ""),
                   "" if usable >= 4 else "Use --workers/--threads no larger than the usable CPUs.")]
    if not flags:
        out.append(Finding("cpu_flags", "info", "/proc/cpuinfo unreadable: CPU flags unknown",
                           "MFU on CPU is estimated with a generic peak."))
        return out
    have = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
        "neon/asimd": "asimd" in flags or "neon" in flags,
    }
    found = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
    if have["amx_bf16"] or have["avx512_bf16"]:
        out.append(Finding("cpu_flags", "ok", found, "Native bf16 matmuls on this CPU: `--dtype bfloat16` speeds up "
                                                     "CPU training and serving."))
    elif have["avx512f"] or have["avx2"] or have["neon/asimd"]:
        out.append(Finding("cpu_flags", "info", found,
                           "Vector float32 matmuls; no native bf16: bfloat16 on this CPU is emulated and usually "
                           "slower than float32.", "Keep `--dtype float32` for CPU runs."))
    else:
        out.append(Finding("cpu_flags", "warn", found, "No AVX2/AVX-512/NEON: matmuls will be slow.",
                           "Use a machine with AVX2 or better for anything beyond the demo."))
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > usable:
        out.append(Finding("threads", "warn", f"OMP_NUM_THREADS={threads} > {usable} usable CPUs",
                           "Oversubscribed threads slow every matmul down.", f"export OMP_NUM_THREADS={usable}"))
    else:
        out.append(Finding("threads", "ok", f"OMP_NUM_THREADS={threads or 'unset'}",
                           "torch picks its thread count from the usable CPUs (or --threads)."))
    return out


def check_memory_disk(path: str | os.PathLike = ".") -> list[Finding]:
    out = []
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, avail = vm.total / 2**30, vm.available / 2**30
        level = "ok" if avail >= 4 else "warn"
        out.append(Finding("memory", level, f"{avail:.1f} GiB available of {total:.1f} GiB",
                           "The demo needs ~2 GiB; SmolLM2-135M fine-tuning ~3 GiB; serving holds the model + KV cache.",
                           "" if level == "ok" else "Close other processes, lower --batch-size / --max-batch-size."))
    except ImportError:
        out.append(Finding("memory", "info", "psutil not installed: memory unknown", "", "pip install psutil"))
    target = Path(path).resolve()
    while not target.exists():
        target = target.parent
    du = shutil.disk_usage(target)
    free = du.free / 2**30
    level = "ok" if free >= 5 else ("warn" if free >= 1 else "fail")
    out.append(Finding("disk", level, f"{free:.1f} GiB free of {du.total / 2**30:.1f} GiB at {target}",
                       "Runs, checkpoints and token shards are written there ($LMFORGE_HOME).",
                       "" if level == "ok" else "Free space or point LMFORGE_HOME at a larger disk."))
    return out


def _extras_from_metadata() -> dict[str, list[str]]:
    extras: dict[str, list[str]] = {}
    try:
        reqs = importlib.metadata.requires("lmforge") or []
    except importlib.metadata.PackageNotFoundError:
        return extras
    for req in reqs:
        m = re.search(r"""extra\s*==\s*['"]([\w.-]+)['"]""", req)
        if m:
            extras.setdefault(m.group(1), []).append(req.split(";")[0].strip())
    return extras


def _extras_from_pyproject() -> dict[str, list[str]]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return {}
    data = tomllib.loads(pyproject.read_text())
    return data.get("project", {}).get("optional-dependencies", {})


def _dist_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]


def check_extras(deep: bool = False) -> list[Finding]:
    """One finding per optional extra of lmforge: are its packages installed (and, with ``deep``, do they import)?"""
    extras = _extras_from_pyproject() or _extras_from_metadata()
    if not extras:
        return [Finding("extras", "info", "lmforge's extras are unknown (not installed as a package)")]
    modules: dict[str, list[str]] = {}
    for mod, dists in importlib.metadata.packages_distributions().items():
        for d in dists:
            modules.setdefault(d.lower().replace("_", "-"), []).append(mod)
    out = []
    for extra, reqs in extras.items():
        missing, broken = [], []
        for req in reqs:
            name = _dist_name(req)
            if name.startswith("lmforge"):
                continue  # `test` pulls other extras in; they are checked on their own
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(name)
                continue
            if deep:
                for mod in modules.get(name.lower().replace("_", "-"), [])[:1]:
                    try:
                        importlib.import_module(mod)
                    except Exception as err:  # noqa: BLE001 - any import failure is the finding
                        broken.append(f"{name} ({type(err).__name__}: {err})")
        if missing or broken:
            found = "; ".join(filter(None, ["missing " + ", ".join(missing) if missing else "",
                                             "fails to import " + ", ".join(broken) if broken else ""]))
            out.append(Finding(f"extra:{extra}", "warn", found,
                               f"Features of the `{extra}` extra are unavailable.",
                               f"pip install 'lmforge[{extra}]'"))
        else:
            out.append(Finding(f"extra:{extra}", "ok", "installed" + (" and imports" if deep else ""),
                               f"Features of the `{extra}` extra work."))
    return out


def run_checks(deep: bool = False, home: str | os.PathLike | None = None) -> list[Finding]:
    findings = [check_python(), *check_torch(), *check_cpu(),
                *check_memory_disk(home or os.environ.get("LMFORGE_HOME", "runs")), *check_extras(deep)]
    return findings


# ----------------------------------------------------------------------------------------------------------------------
# distributed (under torchrun)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_env(env: dict[str, str] | None = None) -> list[Finding]:
    """The torchrun variables this process sees, before any collective is tried."""
    env = dict(os.environ if env is None else env)
    missing = [k for k in ENV_VARS if k not in env]
    if missing:
        return [Finding("env", "fail", "missing " + ", ".join(missing),
                        "This process was not started by torchrun: it cannot join a process group.",
                        "Run: torchrun --nproc_per_node N -m lmforge.cli doctor --distributed")]
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        port = int(env["MASTER_PORT"])
    except ValueError as err:
        return [Finding("env", "fail", f"a torchrun variable is not a number ({err})",
                        "The process group cannot form.", "Let torchrun set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT.")]
    problems = []
    if not 0 <= rank < world:
        problems.append(f"RANK={rank} outside [0, WORLD_SIZE={world})")
    if local < 0 or local > rank:
        problems.append(f"LOCAL_RANK={local} larger than RANK={rank}")
    if not 0 < port < 65536:
        problems.append(f"MASTER_PORT={port} is not a TCP port")
    if problems:
        return [Finding("env", "fail", "; ".join(problems), "The process group cannot form with these values.",
                        "Start every node with the same --nnodes/--nproc_per_node and a distinct --node_rank.")]
    return [Finding("env", "ok", f"rank {rank} of {world} (local {local}), master {env['MASTER_ADDR']}:{port}",
                    "torchrun set the rendezvous variables.")]


def check_master(addr: str, port: int, rank: int, timeout: float = 3.0) -> Finding:
    """Can this process resolve MASTER_ADDR and (off rank 0) open a TCP connection to MASTER_PORT?"""
    try:
        ip = socket.gethostbyname(addr)
    except OSError as err:
        return Finding("master", "fail", f"MASTER_ADDR={addr} does not resolve ({err})",
                       "No process can reach the rendezvous.",
                       "Use an IP address or a hostname every node resolves (check /etc/hosts, DNS).")
    if rank == 0:
        return Finding("master", "ok", f"{addr} resolves to {ip}; rank 0 hosts the store on port {port}")
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            pass
    except OSError as err:
        return Finding("master", "fail", f"cannot connect to {addr}:{port} ({err})",
                       "The rank-0 store is unreachable: a firewall, the wrong interface or rank 0 not started.",
                       f"Open TCP port {port} on {addr} (and the ephemeral ports gloo/NCCL use), or set "
                       "MASTER_ADDR to an address of rank 0 on the network the nodes share "
                       "(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME pick the interface).")
    return Finding("master", "ok", f"{addr}:{port} reachable ({ip})")


def _bandwidth(dist: Any, torch: Any, device: Any, sizes_mb: list[float], repeats: int) -> list[dict[str, float]]:
    out = []
    world = dist.get_world_size()
    for mb in sizes_mb:
        n = max(1, int(mb * 2**20 / 4))
        x = torch.ones(n, dtype=torch.float32, device=device)
        dist.all_reduce(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / repeats
        size = n * 4
        # bus bandwidth as nccl-tests defines it: what each rank sends and receives in a ring all-reduce
        busbw = size * 2 * (world - 1) / world / dt if world > 1 else 0.0
        out.append({"size_mb": round(size / 2**20, 3), "ms": round(dt * 1e3, 3),
                    "algbw_gbps": round(size / dt / 1e9, 3), "busbw_gbps": round(busbw / 1e9, 3)})
    return out


def run_distributed(sizes_mb: list[float] | None = None, repeats: int = 5, timeout_s: float = 60.0,
                    env: dict[str, str] | None = None) -> dict[str, Any]:
    """Checks one process of a torchrun launch: env, rendezvous, an all-reduce whose result is known, bandwidth.

    Returns ``{"rank", "world_size", "findings": [...], "bandwidth": [...] }`` for this rank; rank 0 also gets
    ``"ranks"``: every rank's results (gathered), so it can print one report."""
    env_map = dict(os.environ if env is None else env)
    findings = check_env(env_map)
    result: dict[str, Any] = {"rank": int(env_map.get("RANK", 0) or 0) if findings[0].level == "ok" else None,
                              "world_size": None, "findings": findings, "bandwidth": []}
    if findings[0].level != "ok":
        return result
    rank, world = int(env_map["RANK"]), int(env_map["WORLD_SIZE"])
    result["world_size"] = world
    master = check_master(env_map["MASTER_ADDR"], int(env_map["MASTER_PORT"]), rank)
    findings.append(master)
    if master.level == "fail":
        return result
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device(f"cuda:{int(env_map['LOCAL_RANK'])}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as err:  # noqa: BLE001 - every rendezvous failure becomes a diagnosis
        text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        timed_out = "timeout" in text.lower() or "timed out" in text.lower()
        findings.append(Finding(
            "rendezvous", "fail", text,
            "Not every process joined within the timeout." if timed_out else "The process group did not form.",
            "Start all nodes (same --nnodes, --nproc_per_node, --master_addr, --master_port, distinct --node_rank); "
            "check the firewall between them; set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME to the shared interface."))
        return result
    try:
        findings.append(Finding("rendezvous", "ok", f"{backend} group of {dist.get_world_size()} formed in "
                                                    f"{time.perf_counter() - t0:.2f} s"))
        if dist.get_world_size() != world:
            findings.append(Finding("world", "fail", f"group has {dist.get_world_size()} ranks, WORLD_SIZE={world}",
                                    "Ranks disagree on the world size.", "Launch every node with the same torchrun "
                                                                         "arguments."))
        # every rank contributes rank+1: the sum is known in advance
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x)
        expect = world * (world + 1) / 2
        ok = bool(torch.all(x == expect))
        findings.append(Finding("all_reduce", "ok" if ok else "fail",
                                f"sum over ranks = {x[0].item():g} (expected {expect:g})",
                                "Gradients are averaged correctly." if ok else
                                "Collectives return wrong values: training would silently diverge between ranks.",
                                "" if ok else "Check for mismatched torch/NCCL versions across nodes and "
                                              "NCCL_P2P_DISABLE=1 / NCCL_IB_DISABLE=1 on faulty links."))
        # the env every rank saw: mismatches (different MASTER_PORT, WORLD_SIZE) are a classic multi-node mistake
        seen = {k: env_map.get(k) for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        seen["torch"] = torch.__version__
        seen["host"] = socket.gethostname()
        all_seen: list[Any] = [None] * world
        dist.all_gather_object(all_seen, seen)
        for key in ("WORLD_SIZE", "MASTER_PORT", "torch"):
            values = {s[key] for s in all_seen}
            if len(values) > 1:
                findings.append(Finding(f"consistency:{key}", "fail", f"ranks disagree: {sorted(map(str, values))}",
                                        "Processes started with different settings.",
                                        "Use identical torchrun arguments and the same lmforge/torch install on "
                                        "every node."))
        result["bandwidth"] = _bandwidth(dist, torch, device, sizes_mb or [1, 8, 32], repeats)
        result["hosts"] = sorted({s["host"] for s in all_seen})
        gathered: list[Any] = [None] * world
        mine = {"rank": rank, "findings": [f.as_dict() for f in findings], "bandwidth": result["bandwidth"]}
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            result["ranks"] = gathered
    finally:
        dist.destroy_process_group()
    return result


def summary(findings: list[Finding]) -> str:
    worst = max((LEVELS.index(f.level) for f in findings), default=0)
    return LEVELS[worst]


def print_report(as_json: bool = False, distributed: bool = False, deep: bool = False,
                 sizes_mb: list[float] | None = None, timeout_s: float = 60.0) -> int:
    """Run the checks and print them (a table, or JSON); the exit code is 1 when something failed."""
    from rich.table import Table

    from lmforge.progress import console

    colour = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "red"}

    def table(findings: list[dict[str, str]], title: str) -> Table:
        t = Table(title=title, show_lines=False)
        for col in ("check", "level", "found", "meaning", "fix"):
            t.add_column(col, overflow="fold")
        for f in findings:
            t.add_row(f["check"], f"[{colour[f['level']]}]{f['level']}[/]", f["found"], f["meaning"], f["fix"])
        return t

    if not distributed:
        findings = run_checks(deep)
        if as_json:
            print(json.dumps({"status": summary(findings), "findings": [f.as_dict() for f in findings]}, indent=2))
        else:
            console.print(table([f.as_dict() for f in findings], "lmforge doctor"))
        return 1 if summary(findings) == "fail" else 0

    result = run_distributed(sizes_mb, timeout_s=timeout_s)
    mine = [f.as_dict() for f in result["findings"]]
    status = summary(result["findings"])
    if "ranks" not in result:  # not rank 0, or the group never formed: each process reports for itself
        if result["rank"] in (None, 0) or status == "fail":
            if as_json:
                print(json.dumps({"rank": result["rank"], "status": status, "findings": mine}))
            else:
                console.print(table(mine, f"lmforge doctor --distributed (rank {result['rank']})"))
        return 1 if status == "fail" else 0
    ranks = result["ranks"]
    status = max((summary([Finding(**f) for f in r["findings"]]) for r in ranks), key=LEVELS.index)
    if as_json:
        print(json.dumps({"status": status, "world_size": result["world_size"], "hosts": result.get("hosts", []),
                          "ranks": ranks}, indent=2))
    else:
        console.print(table(mine, f"lmforge doctor --distributed: rank 0 of {result['world_size']}"))
        for r in ranks[1:]:
            bad = [f for f in r["findings"] if f["level"] in ("warn", "fail")]
            if bad:
                console.print(table(bad, f"rank {r['rank']}: problems"))
        bw = Table(title="all-reduce bandwidth per rank (float32; busbw as nccl-tests)")
        for col in ("rank", "size MiB", "ms", "algbw GB/s", "busbw GB/s"):
            bw.add_column(col, justify="right")
        for r in ranks:
            for b in r["bandwidth"]:
                bw.add_row(str(r["rank"]), f"{b['size_mb']:g}", f"{b['ms']:.2f}", f"{b['algbw_gbps']:.2f}",
                           f"{b['busbw_gbps']:.2f}")
        console.print(bw)
    return 1 if status == "fail" else 0
