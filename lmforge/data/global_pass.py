"""Phase 2 of the data stage — the corpus-wide steps — as independent tasks that any executor can map.

After phase 1 every shard's survivors sit in ``work/part-i.jsonl.zst`` (with ``lines.npy`` / ``minhash.npy`` tables
when those steps are on).  The corpus-wide decisions are computed from small per-shard tables, each split into tasks
that need no shared state, then applied shard by shard:

1. ``frequent_bucket(b)`` — (line dedup) the repeated-line hashes of one slice of the 64-bit hash space, summed
   over all shards' tables (CCNet-style counting in bounded memory per task).
2. ``prepare_shard(i)`` — the shard's document ids and, for exact dedup, the key of every document that survives
   line removal: ``work/part-i.ids.json``, ``work/part-i.keys.npy``.
3. ``exact_partition(p)`` — (exact dedup) a hash shuffle: the keys whose first 64 bits fall in partition ``p``, from
   every shard; within a key the copy with the lowest (shard, position) wins, exactly as the sequential pass's
   "first copy wins".  Returns the losers as (shard, position, winner shard, winner position).
4. ``band_edges(band)`` — (MinHash) the verified links of one LSH band; the driver joins the links of all bands in
   a union-find whose root is always the smallest member, so the order in which links arrive does not matter.
5. ``apply_shard(i)`` — line removal, the exact-dedup and near-dedup decisions and the final steps on one shard;
   writes ``docs/part-i`` and ``dropped/dedup-part-i`` and returns the shard's step stats, merged by the driver.

The local executor maps them in this process, the Ray executor as Ray tasks; both give byte-identical output.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lmforge.artifacts import atomic_path, write_json
from lmforge.data.documents import Document
from lmforge.data.io import ShardWriter, iter_jsonl
from lmforge.data.steps import Step, dedup_key

EXAMPLES_PER_REASON = 3
LINE_BUCKETS = 16
EXACT_PARTITIONS = 16


def part(i: int) -> str:
    return f"part-{i:05d}"


# what a task is handed: everything by value or by path, so it pickles to a process or a Ray worker


@dataclass
class GlobalPlan:
    out_dir: str
    n_shards: int
    line_dedup: Any = None  # LineDedupParams
    frequent: np.ndarray | None = None  # repeated-line hashes (after frequent_bucket)
    dedup: bool = False
    minhash: Any = None  # MinHashParams
    roots: np.ndarray | None = None  # global cluster roots (after band_edges)
    offsets: list[int] = field(default_factory=list)  # global index of each shard's first document (minhash)
    final_steps: Callable[[], list[Step]] | None = None

    def work(self, i: int, suffix: str) -> Path:
        return Path(self.out_dir) / "work" / f"{part(i)}.{suffix}"

    def read_work(self, i: int) -> Iterator[Document]:
        src = self.work(i, "jsonl.zst")

        def on_error(reason: str, line: int | None, detail: str) -> None:
            raise RuntimeError(f"{src}:{line}: {reason} {detail} (an intermediate shard is damaged; re-run with force)")

        return (Document.from_dict(rec) for _, rec in iter_jsonl(src, on_error))

    def line_step(self) -> Step | None:
        if self.line_dedup is None:
            return None
        from lmforge.data.linededup import RepeatedLineRemoval

        return RepeatedLineRemoval(self.frequent if self.frequent is not None else np.zeros(0, np.uint64),
                                   self.line_dedup)


# 1. repeated lines


def frequent_bucket(table_files: list[str], max_docs: int, bucket: int, buckets: int) -> np.ndarray:
    """The hashes of one of ``buckets`` slices of the 64-bit space whose summed document count is above ``max_docs``."""
    from lmforge.data.linededup import frequent_in_bucket

    return frequent_in_bucket([Path(f) for f in table_files], max_docs, bucket, buckets)


# 2. ids and exact-dedup keys


def prepare_shard(plan: GlobalPlan, i: int) -> int:
    """Write the shard's ids (every document of its work file, in order) and the exact-dedup keys of those that
    survive line removal (rows: key high 64 bits, key low 64 bits, position).  Returns the number of documents."""
    ids: list[str] = []
    rows: list[tuple[int, int, int]] = []
    docs: Iterable[Document] = plan.read_work(i)
    line = plan.line_step()
    if line is not None:
        docs = line(docs)
    for pos, doc in enumerate(docs):
        ids.append(doc.id)
        if plan.dedup and not doc.dropped:
            key = dedup_key(doc.text)
            rows.append((int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little"), pos))
    write_json(plan.work(i, "ids.json"), ids)
    if plan.dedup:
        keys = np.array(rows, dtype=np.uint64).reshape(-1, 3)
        with atomic_path(plan.work(i, "keys.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, keys)
    return len(ids)


# 3. exact dedup: a hash shuffle


def exact_partition(plan: GlobalPlan, p: int, partitions: int) -> np.ndarray:
    """The duplicates among the keys of partition ``p``: rows (shard, position, winner shard, winner position)."""
    chunks = []
    for i in range(plan.n_shards):
        keys = np.load(plan.work(i, "keys.npy"))
        sel = keys[keys[:, 0] % np.uint64(partitions) == np.uint64(p)]
        if len(sel):
            chunks.append(np.column_stack([sel[:, 0], sel[:, 1], np.full(len(sel), i, np.uint64), sel[:, 2]]))
    if not chunks:
        return np.zeros((0, 4), dtype=np.int64)
    rows = np.concatenate(chunks)  # already in (shard, position) order
    order = np.lexsort((rows[:, 1], rows[:, 0]))  # stable: equal keys stay in (shard, position) order
    rows = rows[order]
    same = np.flatnonzero((rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])) + 1
    if not same.size:
        return np.zeros((0, 4), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])])
    first = starts[np.searchsorted(starts, same, side="right") - 1]
    return np.column_stack([rows[same, 2], rows[same, 3], rows[first, 2], rows[first, 3]]).astype(np.int64)


# 4. MinHash: one band's verified links


def band_edges(key_files: list[str], bands: int, group: list[int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The verified links of the LSH bands in ``group`` (one task handles a few bands)."""
    from lmforge.data.minhash import band_links

    links = [band_links([Path(f) for f in key_files], bands, band, threshold) for band in group]
    return (np.concatenate([x for x, _ in links]) if links else np.zeros(0, np.int64),
            np.concatenate([y for _, y in links]) if links else np.zeros(0, np.int64))


def task_count(n_shards: int, most: int) -> int:
    """How many tasks a corpus-wide step is split into: one per shard, at most ``most`` (results do not depend
    on it)."""
    return max(1, min(most, n_shards))


def cluster_roots_from_edges(n: int, edges: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    from lmforge.data.minhash import UnionFind

    uf = UnionFind(n)
    for xs, ys in edges:
        for x, y in zip(xs.tolist(), ys.tolist()):
            uf.union(x, y)
    return uf.roots()


# 5. apply the decisions to one shard


class DecidedDedup(Step):
    """Exact dedup from precomputed decisions: drops ``exact_duplicate`` the documents at the positions the shuffle
    named, with ``meta.duplicate_of`` the winner's id.  Counts every document it is handed to know positions."""

    name = "exact_dedup_v1"

    def __init__(self, duplicate_of: dict[int, str]) -> None:
        super().__init__()
        self.duplicate_of = duplicate_of
        self.pos = 0

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            pos = self.pos
            self.pos += 1
            if doc.dropped:
                yield doc
                continue
            self.stats.docs_in += 1
            winner = self.duplicate_of.get(pos)
            if winner is None:
                self.stats.kept += 1
                yield doc
            else:
                doc.meta["duplicate_of"] = winner
                self.stats.dropped["exact_duplicate"] += 1
                yield doc.drop(self.name, "exact_duplicate")


class _Ids:
    """Document ids of the shards' work files, loaded on first use."""

    def __init__(self, plan: GlobalPlan) -> None:
        self.plan = plan
        self.cache: dict[int, list[str]] = {}

    def __call__(self, shard: int, pos: int) -> str:
        if shard not in self.cache:
            self.cache[shard] = json.loads(self.plan.work(shard, "ids.json").read_text())
        return self.cache[shard][pos]


def apply_shard(plan: GlobalPlan, i: int, duplicates: np.ndarray | None = None) -> dict[str, Any]:
    """Run the corpus-wide steps on shard ``i`` with the precomputed decisions (``duplicates``: this shard's rows of
    :func:`exact_partition`); write ``docs/`` and ``dropped/dedup-``; return counts, examples, step stats, profile."""
    from lmforge.data.executor import Profile, _example

    out = Path(plan.out_dir)
    for tmp in [*(out / "docs").glob(f".{part(i)}.*.tmp-*"), *(out / "dropped").glob(f".dedup-{part(i)}.*.tmp-*")]:
        tmp.unlink(missing_ok=True)  # what a killed earlier attempt of this task left
    ids = _Ids(plan)
    steps: list[Step] = []
    line = plan.line_step()
    if line is not None:
        steps.append(line)
    if plan.dedup:
        rows = duplicates if duplicates is not None else np.zeros((0, 4), np.int64)
        steps.append(DecidedDedup({int(r[1]): ids(int(r[2]), int(r[3])) for r in rows}))
    if plan.minhash is not None:
        from lmforge.data.minhash import NearDedup

        assert plan.roots is not None
        offset = plan.offsets[i]
        size = plan.offsets[i + 1] - offset
        local = plan.roots[offset: offset + size]
        external = {int(r) for r in np.unique(local[local < offset])}
        starts = np.asarray(plan.offsets)
        root_ids = {}
        for r in external:
            shard = int(np.searchsorted(starts, r, side="right") - 1)
            root_ids[r] = ids(shard, r - plan.offsets[shard])
        steps.append(NearDedup(local, offset=offset, root_ids=root_ids, tally=False))
    steps += plan.final_steps() if plan.final_steps else []

    docs: Iterable[Document] = plan.read_work(i)
    for step in steps:
        docs = step(docs)
    examples: dict[str, list[dict[str, Any]]] = {}
    profile = Profile()
    with ShardWriter(out / "docs" / f"{part(i)}.jsonl.zst") as keep:
        drop = ShardWriter(out / "dropped" / f"dedup-{part(i)}.jsonl.zst") if steps else None
        try:
            for doc in docs:
                if doc.dropped:
                    drop.write(doc)  # type: ignore[union-attr]
                    ex = examples.setdefault(doc.meta["drop_reason"], [])
                    if len(ex) < EXAMPLES_PER_REASON:
                        ex.append(_example(doc))
                else:
                    keep.write(doc)
                    profile.add(doc)
        finally:
            if drop is not None:
                drop.close()
    for step in steps:
        finish = getattr(step, "finish", None)
        if finish is not None:
            finish()
        step.stats.check()
    return {"kept": keep.count, "kept_bytes": keep.text_bytes, "examples": examples,
            "steps": [step.stats.to_dict(full=True) for step in steps], "profile": profile.to_dict()}


def merge_shard_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-shard results of :func:`apply_shard` (in shard order) into one."""
    kept = sum(r["kept"] for r in results)
    kept_bytes = sum(r["kept_bytes"] for r in results)
    examples: dict[str, list[dict[str, Any]]] = {}
    steps: list[dict[str, Any]] = []
    tables: dict[str, Counter] = {}
    for r in results:
        for reason, exs in r["examples"].items():
            have = examples.setdefault(reason, [])
            have.extend(exs[: EXAMPLES_PER_REASON - len(have)])
        for k, st in enumerate(r["steps"]):
            if k == len(steps):
                steps.append({"name": st["name"], "in": 0, "kept": 0, "dropped": Counter(), "seconds": 0.0,
                              "tallies": {}})
            s = steps[k]
            s["in"] += st["in"]
            s["kept"] += st["kept"]
            if st.get("added"):  # a per-shard step after the dedup steps may split documents
                s["added"] = s.get("added", 0) + st["added"]
            s["dropped"].update(st["dropped"])
            s["seconds"] += st["seconds"]
            for table, counts in st["tallies"].items():
                s["tallies"].setdefault(table, Counter()).update(counts)
        for table, counts in r["profile"].items():
            tables.setdefault(table, Counter()).update(counts)
    for s in steps:
        s["dropped"] = dict(sorted(s["dropped"].items()))
        s["seconds"] = round(s["seconds"], 4)
        s["tallies"] = {k: dict(sorted(v.items())) for k, v in sorted(s["tallies"].items())}
    return {"kept": kept, "kept_bytes": kept_bytes, "examples": examples, "steps": steps,
            "profile": {k: dict(v) for k, v in tables.items()}}
