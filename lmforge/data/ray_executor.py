"""The Ray executor: the data stage's shards and corpus-wide tasks as Ray tasks (``--executor ray``).

Nothing here knows what a step does: phase 1 runs :func:`lmforge.data.executor.run_shard` on each shard, phase 2 the
tasks of :mod:`lmforge.data.global_pass`, exactly what the local executor runs, so the output is byte-identical.

- ``--ray-address`` names a running cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``); without it a local Ray
  instance with ``--workers`` CPUs is started for the run and stopped after it.
- The output folder must be visible to every node (a shared file system: NFS, a mounted bucket), as each task writes
  its shard's files there; every node needs lmforge installed (the same version).
- A task whose worker process dies (killed, out of memory) is retried ``LMFORGE_RAY_RETRIES`` times (3); a shard
  that still fails is reported with its error after the other shards finish, and a re-run resumes from the shards
  that are done (their completion markers).  An error raised by the step code itself is not retried: it would fail
  the same way again.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

RETRIES_ENV = "LMFORGE_RAY_RETRIES"


class RayExecutorError(ValueError):
    """A cluster that cannot be reached, shards that failed after their retries: one clear line for the CLI."""
_started_here = False


def _ray():
    try:
        import ray
    except ImportError:
        raise RayExecutorError("--executor ray needs Ray: pip install 'lmforge[ray]'") from None
    return ray


def retries() -> int:
    return int(os.environ.get(RETRIES_ENV, "3"))


def connect(address: str | None, workers: int) -> None:
    """Join the cluster at ``address``, or start a local Ray instance with ``workers`` CPUs."""
    global _started_here
    ray = _ray()
    if ray.is_initialized():
        return
    if address and address != "auto":
        _check_reachable(address)
    env = {"env_vars": {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", RETRIES_ENV) if k in os.environ}}
    try:
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=workers, include_dashboard=False, runtime_env=env, log_to_driver=False,
                     logging_level="ERROR")
            _started_here = True
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayExecutorError(f"data: cannot connect to {where}: {first}") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the address in the message, where Ray itself would retry for minutes."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayExecutorError(f"data: --ray-address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayExecutorError(f"data: cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start it with "
                           f"`ray start --head` or check the address") from None


def shutdown() -> None:
    """Stop the local Ray instance this process started (a cluster joined by address keeps running)."""
    global _started_here
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()
    _started_here = False


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def run_shards(tasks: list[Any], fn: Callable[[Any], dict[str, Any]]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Run ``fn(task)`` for every shard task on the cluster; yield ``(task, stats)`` as shards finish.

    Shards that still fail after the retries are reported together at the end (the others finish first); Ctrl-C
    cancels the pending tasks."""
    ray = _ray()
    remote = ray.remote(num_cpus=1, max_retries=retries())(fn)
    refs = {remote.remote(t): t for t in tasks}
    failures: list[str] = []
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                task = refs.pop(ref)
                try:
                    yield task, ray.get(ref)
                except (ray.exceptions.RayError, OSError) as e:
                    names = ", ".join(os.path.basename(f) for f in task.files[:3])
                    failures.append(f"part-{task.index:05d} ({len(task.files)} files: {names}"
                                    f"{' …' if len(task.files) > 3 else ''}): {_describe(e)}")
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    if failures:
        raise RayExecutorError(f"data: {len(failures)} of {len(tasks)} shard(s) failed after {retries()} retries "
                           f"(the others are done; re-run to retry only these): " + "; ".join(failures))


def map_tasks(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
    """``[fn(*a) for a in args]`` as Ray tasks, results in order.  An argument object shared by several calls (the
    phase-2 plan, a list of table paths) is put in the object store once."""
    ray = _ray()
    if not args:
        return []
    remote = ray.remote(num_cpus=1, max_retries=retries())(fn)
    shared: dict[int, Any] = {}

    def ref(x: Any) -> Any:
        if isinstance(x, (int, float, str, bool, type(None))):
            return x
        if id(x) not in shared:
            shared[id(x)] = ray.put(x)
        return shared[id(x)]

    refs = [remote.remote(*[ref(x) for x in a]) for a in args]
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:
        raise RayExecutorError(f"data: a corpus-wide task ({getattr(fn, '__name__', fn)}) failed: {_describe(e)}") from None
    except BaseException:
        for r in refs:
            ray.cancel(r, force=True)
        raise
