"""The local executor: shard the input files, run the same steps on every shard (in worker processes if asked),
write per-shard outputs with a completion marker, then a final pass for global exact dedup, and merge the stats.

Layout of the output folder::

    docs/part-00000.jsonl.zst            kept documents (what later stages read; .parquet with output_format parquet)
    dropped/part-00000.jsonl.zst         documents dropped by a filter, with meta.drop_reason / meta.drop_step
    dropped/dedup-part-00000.jsonl.zst   exact duplicates (meta.duplicate_of names the kept copy)
    work/part-00000.stats.json           per-shard counts (the survivors of phase 1 live here until phase 2 is done)
    work/part-00000.lines.npy            (line_dedup) the shard's line hashes and the documents holding each
    .done/part-00000                     completion marker holding the run fingerprint
    stats.json, report.html

Phase 1 (parallel, resumable): read → steps → ``work/part-i.jsonl.zst`` + ``dropped/part-i.jsonl.zst``, then the
marker.  A resumed run skips every shard whose marker holds the same fingerprint.  Phase 2: the corpus-wide steps
(repeated lines, exact dedup, MinHash) as independent tasks over small per-shard tables (:mod:`global_pass`), then
one task per shard applies the decisions and writes ``docs/``; "first copy wins" is global and deterministic.  The
local executor runs the tasks in this process, the Ray executor (:mod:`ray_executor`) as Ray tasks.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lmforge.artifacts import atomic_path, write_json, write_text
from lmforge.data.documents import Document
from lmforge.data.io import ShardWriter, iter_jsonl
from lmforge.data.readers import ReadLog
from lmforge.data.steps import Step, StepStats

EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 400

StepsFactory = Callable[[], list[Step]]
Reader = Callable[[Path, ReadLog], Iterator[Document]]


def part(i: int) -> str:
    return f"part-{i:05d}"


def plan_shards(files: list[Path], n_shards: int) -> list[list[Path]]:
    """Deterministic size-balanced assignment: biggest file first onto the lightest shard (lowest index on ties);
    within a shard, files keep their input order."""
    n_shards = max(1, n_shards)
    order = {f: i for i, f in enumerate(files)}
    loads = [0] * n_shards
    shards: list[list[Path]] = [[] for _ in range(n_shards)]
    for f in sorted(files, key=lambda f: (-f.stat().st_size, order[f])):
        k = min(range(n_shards), key=lambda j: (loads[j], j))
        shards[k].append(f)
        loads[k] += f.stat().st_size
    return [sorted(s, key=order.__getitem__) for s in shards]


def _example(doc: Document) -> dict[str, Any]:
    return {
        "id": doc.id,
        "source": doc.meta.get("source"),
        "url": doc.meta.get("url"),
        "snippet": doc.text[:SNIPPET_CHARS],
        "scores": doc.meta.get("scores", {}),
    }


# ----------------------------------------------------------------------------------------------------------------------
# phase 1: one shard


@dataclass
class ShardTask:
    index: int
    files: list[str]
    out_dir: str
    fingerprint: str
    make_steps: StepsFactory
    reader: Reader
    minhash: Any = None  # MinHashParams: also write the kept documents' LSH band keys
    line_dedup: Any = None  # LineDedupParams: also write the shard's (line hash, documents) table


def shard_done(out_dir: Path, i: int, fingerprint: str, minhash: bool = False, line_dedup: bool = False) -> bool:
    marker = out_dir / ".done" / part(i)
    return (
        marker.is_file()
        and marker.read_text().strip() == fingerprint
        and (out_dir / "work" / f"{part(i)}.jsonl.zst").is_file()
        and (out_dir / "work" / f"{part(i)}.stats.json").is_file()
        and (not minhash or (out_dir / "work" / f"{part(i)}.minhash.npy").is_file())
        and (not line_dedup or (out_dir / "work" / f"{part(i)}.lines.npy").is_file())
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def run_shard(task: ShardTask, on_file: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Read the shard's files, run the steps, write survivors and dropped docs, then the marker; returns its stats.

    ``on_file(files_done, docs_read)`` is called after each file (for a progress bar in the parent process).
    """
    out = Path(task.out_dir)
    remove_partial_files(out, task.index)
    t0 = time.time()
    log = ReadLog()
    steps = task.make_steps()
    counter = {"docs": 0, "chars": 0}

    def read_all() -> Iterator[Document]:
        for k, f in enumerate(task.files, 1):
            for doc in task.reader(Path(f), log):
                counter["docs"] += 1
                counter["chars"] += len(doc.text)
                yield doc
            if on_file:
                on_file(k, counter["docs"])

    stream: Iterable[Document] = read_all()
    for step in steps:
        stream = step(stream)

    examples: dict[str, list[dict[str, Any]]] = {}
    dropped_bytes = 0
    hasher = None
    band_keys: list[np.ndarray] = []
    if task.minhash is not None:
        from lmforge.data.minhash import MinHasher

        hasher = MinHasher(task.minhash)
    t_minhash = 0.0
    line_counter = None
    if task.line_dedup is not None:
        from lmforge.data.linededup import HashCounter

        line_counter = HashCounter()
    t_lines = 0.0
    with ShardWriter(out / "work" / f"{part(task.index)}.jsonl.zst") as keep, \
            ShardWriter(out / "dropped" / f"{part(task.index)}.jsonl.zst") as drop:
        for doc in stream:
            if doc.dropped:
                drop.write(doc)
                ex = examples.setdefault(doc.meta["drop_reason"], [])
                if len(ex) < EXAMPLES_PER_REASON:
                    ex.append(_example(doc))
            else:
                keep.write(doc)
                if hasher is not None:
                    t = time.perf_counter()
                    band_keys.append(hasher.record(doc.text))  # bucket keys + signature
                    t_minhash += time.perf_counter() - t
                if line_counter is not None:
                    t = time.perf_counter()
                    line_counter.add(task.line_dedup.hashes(doc.text))
                    t_lines += time.perf_counter() - t
        kept_count, kept_bytes, dropped_bytes = keep.count, keep.text_bytes, drop.text_bytes
        dropped_count = drop.count

    if hasher is not None:
        width = task.minhash.bands * (1 + task.minhash.rows)
        keys = np.stack(band_keys) if band_keys else np.zeros((0, width), dtype=np.uint64)
        _save_npy(out / "work" / f"{part(task.index)}.minhash.npy", keys)
    if line_counter is not None:
        _save_npy(out / "work" / f"{part(task.index)}.lines.npy", line_counter.table())
    step_stats = [s.stats for s in steps]
    check_chain(counter["docs"], step_stats, kept_count)
    added = sum(s.added for s in step_stats)
    if counter["docs"] + added != kept_count + dropped_count:
        raise AssertionError(f"shard {task.index}: {counter['docs']} read + {added} added != {kept_count} kept + "
                             f"{dropped_count} dropped")
    for reason, exs in log.examples.items():
        examples.setdefault(reason, exs)
    stats = {
        "index": task.index,
        "files": task.files,
        "docs_read": counter["docs"],
        "chars_read": counter["chars"],
        "read_errors": dict(log.errors),
        "records_skipped": dict(log.skipped),
        "steps": [s.to_dict(full=True) for s in step_stats],
        "minhash_seconds": round(t_minhash, 4),
        "line_hash_seconds": round(t_lines, 4),
        "kept": kept_count,
        "kept_bytes": kept_bytes,
        "dropped": dropped_count,
        "dropped_bytes": dropped_bytes,
        "examples": examples,
        "seconds": round(time.time() - t0, 3),
    }
    write_json(out / "work" / f"{part(task.index)}.stats.json", stats)
    (out / ".done").mkdir(parents=True, exist_ok=True)
    write_text(out / ".done" / part(task.index), task.fingerprint + "\n")
    return stats


def check_chain(docs_read: int, steps: list[StepStats], kept: int) -> None:
    """Conservation: every step's in = kept + dropped, each step sees what the previous one kept."""
    expected = docs_read
    for s in steps:
        s.check()
        if s.docs_in != expected:
            raise AssertionError(f"conservation violated: {s.name} saw {s.docs_in} documents, expected {expected}")
        expected = s.kept
    if kept != expected:
        raise AssertionError(f"conservation violated: {kept} documents written, the last step kept {expected}")


def _run_task(task: ShardTask) -> dict[str, Any]:  # top level: picklable for worker processes
    return run_shard(task)


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (a terminal sends SIGINT to the whole process group): the parent cancels
    the pending shards and stops the workers, so one interrupt never leaves half the pool running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_pool(pool: ProcessPoolExecutor, timeout: float = 10.0) -> None:
    """Cancel the shards not started yet and stop the workers now (SIGTERM, then SIGKILL after ``timeout`` s); a
    shard cut short has no completion marker, so a re-run does it again."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def remove_partial_files(out_dir: Path, shard: int | None = None) -> None:
    """Temporary files of shards that were cut short (killed or interrupted mid-write): all, or one shard's (a
    retried shard task clears what its killed attempt left)."""
    pattern = f".{part(shard)}.*.tmp-*" if shard is not None else ".*.tmp-*"
    for sub in ("work", "dropped", "docs"):
        for tmp in (out_dir / sub).glob(pattern):
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# phase 2: the corpus-wide steps


def _bin(x: float, edges: tuple[float, ...]) -> str:
    """The label of the histogram bin of ``x`` (edges ascending; the last bin is open)."""
    for lo, hi in zip(edges, edges[1:]):
        if x < hi:
            return f"{lo:g}-{hi:g}"
    return f"{edges[-1]:g}+"


LENGTH_EDGES = (0, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
SCORE_EDGES = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Profile:
    """Histograms of the kept documents: length (chars), language, language score, quality score, domain."""

    def __init__(self) -> None:
        self.tables: dict[str, Counter] = {k: Counter() for k in ("length", "lang", "lang_score", "quality", "domain")}
        self.chars: dict[str, Counter] = {"lang": Counter(), "domain": Counter()}

    def add(self, doc: Document) -> None:
        m = doc.meta
        n = len(doc.text)
        self.tables["length"][_bin(n, LENGTH_EDGES)] += 1
        for key in ("lang", "domain"):
            if key in m:
                self.tables[key][str(m[key])] += 1
                self.chars[key][str(m[key])] += n
        if "lang_score" in m:
            self.tables["lang_score"][_bin(float(m["lang_score"]), SCORE_EDGES)] += 1
        if "quality" in m:
            self.tables["quality"][_bin(float(m["quality"]), SCORE_EDGES)] += 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: dict(v) for k, v in self.tables.items() if v}
        for key, c in self.chars.items():
            if c:
                d[f"{key}_chars"] = dict(c)
        return d


Mapper = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def local_map(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
    """The local executor's way of running independent tasks: one after the other, in this process."""
    return [fn(*a) for a in args]


def global_pass(out_dir: Path, n_shards: int, results: dict[int, dict[str, Any]], mapper: Mapper, *,
                line_dedup: Any = None, dedup: bool = False, minhash: Any = None,
                final_steps: Callable[[], list[Step]] | None = None) -> dict[str, Any]:
    """Phase 2: the corpus-wide steps (repeated lines, exact dedup, MinHash near-dedup, then ``final_steps``) over
    the survivors of all shards, as the independent tasks of :mod:`lmforge.data.global_pass` run by ``mapper``;
    writes ``docs/`` (and the documents they drop to ``dropped/dedup-part-*``)."""
    from lmforge.data import global_pass as gp

    plan = gp.GlobalPlan(str(out_dir), n_shards, line_dedup=line_dedup, dedup=dedup, minhash=minhash,
                         final_steps=final_steps)
    line_seconds = cluster_seconds = 0.0
    if line_dedup is not None:
        t = time.time()
        tables = [str(plan.work(i, "lines.npy")) for i in range(n_shards)]
        n = gp.LINE_BUCKETS  # slices of the hash space: memory per task is about 1/n of the tables
        found = mapper(gp.frequent_bucket, [(tables, line_dedup.max_docs, b, n) for b in range(n)])
        plan.frequent = np.concatenate(found) if found else np.zeros(0, np.uint64)
        line_seconds = time.time() - t
    if dedup or minhash is not None:
        mapper(gp.prepare_shard, [(plan, i) for i in range(n_shards)])
    duplicates: list[np.ndarray | None] = [None] * n_shards
    if dedup:
        n = gp.EXACT_PARTITIONS
        rows = mapper(gp.exact_partition, [(plan, p, n) for p in range(n)])
        allrows = np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)
        duplicates = [allrows[allrows[:, 0] == i] for i in range(n_shards)]
    if minhash is not None:
        t = time.time()
        key_files = [str(plan.work(i, "minhash.npy")) for i in range(n_shards)]
        sizes = [np.load(f, mmap_mode="r").shape[0] for f in key_files]
        plan.offsets = np.cumsum([0] + sizes).tolist()
        n = gp.task_count(n_shards, minhash.bands)
        edges = mapper(gp.band_edges, [(key_files, minhash.bands, list(range(minhash.bands))[g::n], minhash.threshold)
                                       for g in range(n)])
        plan.roots = gp.cluster_roots_from_edges(plan.offsets[-1], edges)
        cluster_seconds = time.time() - t
    final = gp.merge_shard_results(mapper(gp.apply_shard, [(plan, i, duplicates[i]) for i in range(n_shards)]))
    for st in final["steps"]:
        if st["name"] == "line_dedup_v1":
            from lmforge.data.linededup import TOP_EXAMPLES

            st["seconds"] = round(st["seconds"] + line_seconds
                                  + sum(r.get("line_hash_seconds", 0.0) for r in results.values()), 4)
            st["tallies"]["frequent"] = {"distinct_units": int(len(plan.frequent))}
            top = sorted(st["tallies"].get("top_removed", {}).items(), key=lambda kv: (-kv[1], kv[0]))
            if top:  # the most removed units; units tied with the last one stay too (no arbitrary cut)
                cut = top[min(TOP_EXAMPLES, len(top)) - 1][1]
                st["tallies"]["top_removed"] = dict(kv for kv in top if kv[1] >= cut)
        elif st["name"] == "minhash_dedup_v1":
            from lmforge.data.minhash import cluster_size_tally

            st["seconds"] = round(st["seconds"] + cluster_seconds
                                  + sum(r.get("minhash_seconds", 0.0) for r in results.values()), 4)
            sizes_tally = cluster_size_tally(plan.roots)
            if sizes_tally:
                st["tallies"]["cluster_size"] = sizes_tally
    return final


# ----------------------------------------------------------------------------------------------------------------------
# the whole run


def clean(out_dir: Path) -> None:
    """Remove the outputs of an earlier (different or finished) run, before starting afresh."""
    for name in ("docs", "dropped", "work", ".done"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("stats.json", "report.html"):
        (out_dir / name).unlink(missing_ok=True)


def execute(
    files: list[Path],
    out_dir: Path,
    *,
    make_steps: StepsFactory,
    reader: Reader,
    dedup: Step | None = None,
    shards: int,
    workers: int,
    fingerprint: str,
    skipped_files: dict[str, list[str]] | None = None,
    minhash: Any = None,
    final_steps: Callable[[], list[Step]] | None = None,
    select: Any = None,
    output_format: str = "jsonl",
    line_dedup: Any = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run phase 1 on every unfinished shard and phase 2 on all; write and return ``stats.json``'s content.

    Phase 2 runs corpus-wide repeated-line removal when ``line_dedup`` (a ``LineDedupParams``) is given, ``dedup``
    (exact), then MinHash near-dedup when ``minhash`` (a ``MinHashParams``) is given, then the
    steps of ``final_steps()``, over all shards in order; then, if ``select`` (a :class:`~lmforge.data.mixing.MixSpec`)
    is active, the corpus-level top-fraction selection and mixing pass over ``docs/``.

    ``executor="ray"`` runs the shards and the corpus-wide tasks (:mod:`lmforge.data.global_pass`) as Ray tasks on
    the cluster at ``ray_address`` (a local one when None) instead of local processes; the output is the same."""
    from lmforge.progress import console, progress, rate_text

    t0 = time.time()
    remove_partial_files(out_dir)
    plan = plan_shards(files, shards)
    results: dict[int, dict[str, Any]] = {}
    pending: list[ShardTask] = []
    for i, shard_files in enumerate(plan):
        if shard_done(out_dir, i, fingerprint, minhash is not None, line_dedup is not None):
            stats = json.loads((out_dir / "work" / f"{part(i)}.stats.json").read_text())
            stats["resumed"] = True
            results[i] = stats
        else:
            pending.append(ShardTask(i, [str(f) for f in shard_files], str(out_dir), fingerprint, make_steps, reader,
                                     minhash, line_dedup))
    if results:
        console.print(f"[yellow]↻ data[/]: {len(results)} of {len(plan)} shards already done, skipped: "
                      + ", ".join(part(i) for i in sorted(results)))

    total_files = sum(len(t.files) for t in pending)
    with progress() as bar:
        task_id = bar.add_task("data: files", total=total_files, rate="")
        done_files = done_docs = 0
        started = time.time()

        def advance(files_now: int, docs_now: int) -> None:
            bar.update(task_id, completed=files_now,
                       rate=rate_text(docs_now, time.time() - started, "docs"))

        try:
            if executor == "ray":
                from lmforge.data import ray_executor

                ray_executor.connect(ray_address, workers)
                for t, stats in ray_executor.run_shards(pending, _run_task):
                    results[t.index] = stats
                    done_files += len(t.files)
                    done_docs += stats["docs_read"]
                    advance(done_files, done_docs)
            elif workers <= 1 or len(pending) <= 1:
                for t in pending:
                    base_files, base_docs = done_files, done_docs
                    results[t.index] = run_shard(
                        t, on_file=lambda k, d, bf=base_files, bd=base_docs: advance(bf + k, bd + d))
                    done_files += len(t.files)
                    done_docs += results[t.index]["docs_read"]
                    advance(done_files, done_docs)
            else:
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                           initializer=_worker_init)
                try:
                    futures = {pool.submit(_run_task, t): t for t in pending}
                    for fut in as_completed(futures):
                        t = futures[fut]
                        results[t.index] = fut.result()
                        done_files += len(t.files)
                        done_docs += results[t.index]["docs_read"]
                        advance(done_files, done_docs)
                except BaseException:  # Ctrl-C, SIGTERM, a failed shard: no pending shard may keep running
                    stop_pool(pool)
                    raise
                pool.shutdown(wait=True)
        except KeyboardInterrupt:
            finished = sum(shard_done(out_dir, i, fingerprint, minhash is not None, line_dedup is not None)
                           for i in range(len(plan)))
            console.print(f"[yellow]interrupted: {finished} of {len(plan)} shards done; re-run to resume[/]")
            raise
    phase1_s = time.time() - t0

    if executor == "ray":
        from lmforge.data import ray_executor

        mapper: Mapper = ray_executor.map_tasks
    else:
        mapper = local_map
    final = global_pass(out_dir, len(plan), results, mapper, line_dedup=line_dedup, dedup=dedup is not None,
                        minhash=minhash, final_steps=final_steps)
    final["written"], final["copies_added"] = final["kept"], 0
    if select is not None and select.active:
        from lmforge.data.mixing import select_pass

        t_sel = time.time()
        sel = select_pass(out_dir, [part(i) for i in range(len(plan))], select, mapper)
        for st in sel["steps"]:
            st["seconds"] = round((time.time() - t_sel) / len(sel["steps"]), 4)
        final["steps"] += sel["steps"]
        for reason, exs in sel["examples"].items():
            final["examples"].setdefault(reason, exs)
        final.update(kept=sel["kept"], kept_bytes=sel["written_bytes"], written=sel["written"],
                     copies_added=sel["copies_added"], profile=sel["profile"])
    stats = merge_stats([results[i] for i in range(len(plan))], final, files, skipped_files or {},
                        seconds=time.time() - t0, phase1_seconds=phase1_s)
    if output_format == "parquet":
        from lmforge.data.io import jsonl_to_parquet

        for i in range(len(plan)):
            src = out_dir / "docs" / f"{part(i)}.jsonl.zst"
            jsonl_to_parquet(src, out_dir / "docs" / f"{part(i)}.parquet")
            src.unlink()
    elif output_format != "jsonl":
        raise ValueError(f"unknown output_format {output_format!r} (jsonl or parquet)")
    write_json(out_dir / "stats.json", stats)
    for i in range(len(plan)):  # the survivors now live in docs/ (and dropped/dedup-*)
        (out_dir / "work" / f"{part(i)}.jsonl.zst").unlink(missing_ok=True)
        (out_dir / "work" / f"{part(i)}.minhash.npy").unlink(missing_ok=True)
        for suffix in ("lines.npy", "ids.json", "keys.npy"):
            (out_dir / "work" / f"{part(i)}.{suffix}").unlink(missing_ok=True)
    return stats


def merge_stats(
    shards: list[dict[str, Any]],
    final: dict[str, Any],
    files: list[Path],
    skipped_files: dict[str, list[str]],
    seconds: float,
    phase1_seconds: float,
) -> dict[str, Any]:
    read_errors: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    steps: list[dict[str, Any]] = []
    for s in shards:
        read_errors.update(s["read_errors"])
        skipped.update(s["records_skipped"])
        for reason, exs in s["examples"].items():
            have = examples.setdefault(reason, [])
            have.extend(exs[: EXAMPLES_PER_REASON - len(have)])
        for k, st in enumerate(s["steps"]):
            if k == len(steps):
                steps.append({"name": st["name"], "in": 0, "kept": 0, "dropped": Counter(), "seconds": 0.0,
                              "tallies": {}})
            steps[k]["in"] += st["in"]
            steps[k]["kept"] += st["kept"]
            if st.get("added"):
                steps[k]["added"] = steps[k].get("added", 0) + st["added"]
            steps[k]["dropped"].update(st["dropped"])
            steps[k]["seconds"] += st.get("seconds", 0.0)
            for table, counts in st.get("tallies", {}).items():
                steps[k]["tallies"].setdefault(table, Counter()).update(counts)
    docs_read = sum(s["docs_read"] for s in shards)
    for st in final["steps"]:
        steps.append({**st, "dropped": Counter(st["dropped"])})
    for reason, exs in final["examples"].items():
        examples.setdefault(reason, exs)
    for st in steps:
        st["dropped"] = dict(sorted(st["dropped"].items()))
        st["seconds"] = round(st["seconds"], 4)
        st["us_per_doc"] = round(st["seconds"] / st["in"] * 1e6, 1) if st["in"] else None
        st["tallies"] = {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for k, v in st["tallies"].items()}
    dropped_by_reason: Counter[str] = Counter()
    for st in steps:
        dropped_by_reason.update(st["dropped"])
    docs_kept = final["kept"]
    docs_dropped = sum(dropped_by_reason.values())

    # conservation, across shards and the final pass
    expected = docs_read
    docs_added = 0
    for st in steps:
        added = st.get("added", 0)
        docs_added += added
        if st["in"] != expected or st["in"] + added != st["kept"] + sum(st["dropped"].values()):
            raise AssertionError(f"conservation violated in {st['name']}: {st}")
        expected = st["kept"]
    if docs_kept != expected or docs_read + docs_added != docs_kept + docs_dropped:
        raise AssertionError(f"conservation violated: read {docs_read} + added {docs_added}, kept {docs_kept}, "
                             f"dropped {docs_dropped}")

    bytes_in = sum(f.stat().st_size for f in files)
    chars_read = sum(s["chars_read"] for s in shards)
    fresh = [s for s in shards if not s.get("resumed")]  # throughput counts the work done in this run only
    fresh_docs = sum(s["docs_read"] for s in fresh)
    fresh_bytes = sum(Path(f).stat().st_size for s in fresh for f in s["files"])
    fresh_chars = sum(s["chars_read"] for s in fresh)
    return {
        "inputs": {
            "files": len(files),
            "bytes": bytes_in,
            "skipped_files": {k: len(v) for k, v in skipped_files.items()},
            "skipped_file_names": skipped_files,
        },
        "read": {
            "docs": docs_read,
            "chars": chars_read,
            "errors": dict(sorted(read_errors.items())),
            "error_total": sum(read_errors.values()),
            "records_skipped": dict(sorted(skipped.items())),
        },
        "steps": steps,
        "totals": {
            "docs_in": docs_read,
            "docs_kept": docs_kept,
            "docs_dropped": docs_dropped,
            "bytes_kept": final["kept_bytes"],
            "docs_written": final["written"],
            "copies_added": final["copies_added"],
            "docs_added": docs_added,
            "read_errors": sum(read_errors.values()),
        },
        "dropped_by_reason": dict(sorted(dropped_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "shards": [
            {"index": s["index"], "files": len(s["files"]), "docs_read": s["docs_read"],
             "kept_before_dedup": s["kept"], "seconds": s["seconds"], "resumed": bool(s.get("resumed"))}
            for s in shards
        ],
        "timing": {
            "seconds": round(seconds, 3),
            "phase1_seconds": round(phase1_seconds, 3),
            "shards_processed": len(fresh),
            "docs_per_s": round(fresh_docs / seconds, 1) if seconds else None,
            "input_mb_per_s": round(fresh_bytes / 1e6 / seconds, 3) if seconds else None,
            "text_mchars_per_s": round(fresh_chars / 1e6 / seconds, 3) if seconds else None,
        },
        "profile": final["profile"],
        "examples": examples,
    }
