"""Near-duplicate removal with MinHash-LSH, across shards, in bounded memory.

1. **Signatures** (per shard, in the workers): the text is lower-cased, punctuation removed, split into words (CJK
   characters one each) and cut into word ``ngram``-shingles (5 by default, as datatrove); each shingle gets a 32-bit
   hash and ``bands × rows`` (14 × 8) min-hashes ``min(((a·x + b) mod 2^64) >> 32)`` (multiply-shift hashing).  Each band's ``rows`` values are
   hashed to one 64-bit bucket key: a shard writes ``work/part-i.minhash.npy`` (documents × (bands + bands·rows),
   uint64: the bucket keys, then the signature).
2. **Buckets → verified links → union-find** (once, over all shards): one band at a time, the band's keys of every
   document are sorted; a document sharing a key with others is a *candidate* of the first of them (and of the one
   before it in the bucket).  A candidate pair is linked only if its signatures agree on at least ``threshold`` of
   the min-hashes (the estimated Jaccard similarity): without that check a low ``rows`` setting puts unrelated
   documents in one bucket and the union-find chains them into one cluster.  Memory is about 16 bytes per document per
   band pass plus the links; signatures are read from the memory-mapped files only for candidate pairs.
3. **Keep one per cluster**: the document with the lowest global index (shard order, then position) is kept; the
   others are dropped as ``near_duplicate`` with ``meta.duplicate_of``.

Two documents with Jaccard similarity ``s`` share at least one bucket with probability ``1 − (1 − s^rows)^bands``:
0.92 at s = 0.8, 0.56 at s = 0.7, 0.05 at s = 0.5 for 14 × 8; the signature check then keeps the pairs whose
estimated similarity is at least ``threshold`` (0.7 by default, about the S-curve's midpoint ``(1/bands)^(1/rows)``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmforge.data.documents import Document
from lmforge.data.filters import WORD_RE
from lmforge.data.steps import Step

_SHIFT = np.uint64(32)
_PUNCT = re.compile(r"[^\w\s]+")
_MUL = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 4096  # shingles per block when min-hashing a long document (bounds the temporary matrix)


@dataclass(frozen=True)
class MinHashParams:
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    threshold: float = 0.7  # min estimated Jaccard similarity of a candidate pair to be linked (0 = no check)


class MinHasher:
    """Shingles, signatures and band keys for one parameter set (the same in every process)."""

    def __init__(self, params: MinHashParams = MinHashParams()) -> None:
        import xxhash

        self.p = params
        rng = np.random.default_rng(params.seed)
        n = params.bands * params.rows
        # multiply-shift hashing (Dietzfelbinger): h(x) = ((a·x + b) mod 2^64) >> 32 with random 64-bit a, b is a
        # strongly universal family for 32-bit x, and needs no modulo (numpy's uint64 arithmetic wraps)
        self.a = rng.integers(0, 1 << 64, n, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 1 << 64, n, dtype=np.uint64, endpoint=False)
        self._word_hash = xxhash.xxh32_intdigest
        self._band_hash = xxhash.xxh64_intdigest

    def words(self, text: str) -> list[str]:
        return WORD_RE.findall(_PUNCT.sub(" ", text.lower()))

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the document's word n-grams (one shingle of all words if it is shorter)."""
        toks = self.words(text)
        if not toks:
            return np.zeros(1, dtype=np.uint64)
        h32 = self._word_hash
        wh = np.fromiter((h32(t.encode("utf-8")) for t in toks), dtype=np.uint64, count=len(toks))
        n = min(self.p.ngram, len(toks))
        h = wh[: len(wh) - n + 1].copy()
        for k in range(1, n):
            h = h * _MUL + wh[k : len(wh) - n + 1 + k]  # wraps modulo 2^64: an order-sensitive n-gram hash
        h = (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
        return np.unique(h)

    def signature(self, text: str) -> np.ndarray:
        """``bands × rows`` min-hashes (uint64)."""
        sh = self.shingles(text)
        sig = np.full(self.a.shape, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(sh), _BLOCK):
            block = sh[i : i + _BLOCK, None]
            np.minimum(sig, ((block * self.a + self.b) >> _SHIFT).min(axis=0), out=sig)
        return sig

    def band_keys(self, text: str) -> np.ndarray:
        """One 64-bit bucket key per band."""
        sig = self.signature(text).reshape(self.p.bands, self.p.rows)
        h = self._band_hash
        return np.fromiter((h(row.tobytes()) for row in sig), dtype=np.uint64, count=self.p.bands)

    def record(self, text: str) -> np.ndarray:
        """What a shard stores per document: the ``bands`` bucket keys, then the ``bands × rows`` signature."""
        sig = self.signature(text)
        h = self._band_hash
        keys = np.fromiter((h(row.tobytes()) for row in sig.reshape(self.p.bands, self.p.rows)), dtype=np.uint64,
                           count=self.p.bands)
        return np.concatenate([keys, sig])


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter) if len(a) + len(b) else 1.0


class UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:  # path compression
            parent[x], x = root, int(parent[x])
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        for i in range(len(self.parent)):
            self.find(i)
        return self.parent


class _Signatures:
    """Signature rows by global document index, from the memory-mapped shard files (columns after the keys)."""

    def __init__(self, key_files: list[Path], bands: int) -> None:
        self.arrays = [np.load(f, mmap_mode="r") for f in key_files]
        self.bands = bands
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])
        self.available = all(a.shape[1] > bands for a in self.arrays if a.shape[0])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        width = next((a.shape[1] for a in self.arrays if a.shape[0]), self.bands) - self.bands
        out = np.empty((len(idx), width), dtype=np.uint64)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.arrays[k][idx[sel] - self.offsets[k], self.bands:]
        return out

    def similar(self, x: np.ndarray, y: np.ndarray, threshold: float, block: int = 65_536) -> np.ndarray:
        """Whether each pair's estimated Jaccard similarity (share of equal min-hashes) is ``>= threshold``."""
        ok = np.empty(len(x), dtype=bool)
        for s in range(0, len(x), block):
            ok[s : s + block] = (self.rows(x[s : s + block]) == self.rows(y[s : s + block])).mean(axis=1) >= threshold
        return ok


def band_links(key_files: list[Path], bands: int, band: int, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The links (x, y) of one LSH band between the documents of ``key_files`` (global indices, in order).

    With ``threshold > 0`` a pair of bucket mates is linked only if their signatures (stored after the keys) estimate
    a Jaccard similarity of at least ``threshold``.  Each document is checked against the first document of its
    bucket and the one before it, so a bucket holding an unrelated first document still links the similar rest."""
    sizes = [np.load(f, mmap_mode="r").shape[0] for f in key_files]
    n = sum(sizes)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n == 0:
        return empty
    sigs = _Signatures(key_files, bands) if threshold > 0 else None
    if sigs is not None and not sigs.available:
        raise ValueError("minhash: the shard files hold bucket keys without signatures (written by an older "
                         "version); re-run the data stage with --force")
    keys = np.empty(n, dtype=np.uint64)
    at = 0
    for f, size in zip(key_files, sizes):
        if size:
            keys[at : at + size] = np.load(f, mmap_mode="r")[:, band]
        at += size
    order = np.argsort(keys, kind="stable")  # equal keys stay in index order: the first is the smallest
    sk = keys[order]
    same = np.flatnonzero(sk[1:] == sk[:-1]) + 1  # positions whose key equals the previous one
    if same.size == 0:
        return empty
    # the first position of each run of equal keys, for every position in `same`
    run_start = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    first = run_start[np.searchsorted(run_start, same, side="right") - 1]
    xs, ys = order[first], order[same]
    if sigs is not None:
        prev = order[same - 1]  # the bucket mate just before (the first one, for the second member)
        ok = sigs.similar(xs, ys, threshold)
        other = prev != xs
        ok_prev = np.zeros(len(ys), dtype=bool)
        if other.any():
            ok_prev[other] = sigs.similar(prev[other], ys[other], threshold)
        xs, ys = np.concatenate([xs[ok], prev[ok_prev]]), np.concatenate([ys[ok], ys[ok_prev]])
    return xs, ys


def cluster_roots(key_files: list[Path], bands: int, threshold: float = 0.0) -> np.ndarray:
    """For the documents of ``key_files`` (in order), the global index of their cluster's first document: the links
    of every band (:func:`band_links`) joined in a union-find."""
    n = sum(np.load(f, mmap_mode="r").shape[0] for f in key_files)
    uf = UnionFind(n)
    for band in range(bands if n else 0):
        xs, ys = band_links(key_files, bands, band, threshold)
        for x, y in zip(xs.tolist(), ys.tolist()):
            uf.union(x, y)
    return uf.roots()


class NearDedup(Step):
    """Drops ``near_duplicate`` documents given the cluster roots of :func:`cluster_roots`.

    It counts every document it is handed (dropped ones too) to know the global index, so it must see exactly the
    documents the signatures were computed for, in the same order.
    """

    name = "minhash_dedup_v1"

    def __init__(self, roots: np.ndarray, offset: int = 0, root_ids: dict[int, str] | None = None,
                 tally: bool = True) -> None:
        """``roots``: the cluster roots of the documents this step will see (global indices); ``offset``: the global
        index of the first of them; ``root_ids``: the ids of roots before ``offset`` (another shard's documents);
        ``tally``: count cluster sizes in :meth:`finish` (off when each shard runs its own step and the driver counts
        them from all roots with :func:`cluster_size_tally`)."""
        super().__init__()
        self.roots = roots
        self.offset = offset
        self.index = 0
        self.root_ids: dict[int, str] = dict(root_ids or {})
        local = np.arange(offset, offset + len(roots))
        members = roots[roots != local]
        has_members = np.zeros(len(roots), dtype=bool)
        has_members[members[members >= offset] - offset] = True
        self.has_members = has_members
        self.tally = tally
        self.cluster_sizes: dict[int, int] = {}

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            k = self.index
            self.index += 1
            i = k + self.offset
            if self.has_members[k]:
                self.root_ids[i] = doc.id
            root = int(self.roots[k])
            if root != i and self.tally:
                self.cluster_sizes[root] = self.cluster_sizes.get(root, 1) + 1
            if doc.dropped:
                yield doc
                continue
            self.stats.docs_in += 1
            if root != i:
                doc.meta["duplicate_of"] = self.root_ids.get(root, str(root))
                self.stats.dropped["near_duplicate"] += 1
                yield doc.drop(self.name, "near_duplicate")
            else:
                self.stats.kept += 1
                yield doc

    def finish(self) -> None:
        if self.index != len(self.roots):
            raise AssertionError(f"{self.name}: saw {self.index} documents, signatures were computed for "
                                 f"{len(self.roots)}")
        for size in self.cluster_sizes.values():
            self.stats.tally("cluster_size", str(size))


def cluster_size_tally(roots: np.ndarray) -> dict[str, int]:
    """How many clusters of each size (2 or more documents) ``roots`` hold: NearDedup's ``cluster_size`` tally."""
    counts = np.bincount(roots, minlength=len(roots)) if len(roots) else np.zeros(0, np.int64)
    sizes = Counter(str(int(c)) for c in counts[counts > 1])
    return dict(sizes)


def near_duplicate_pairs(texts: list[str], params: MinHashParams = MinHashParams()) -> set[tuple[int, int]]:
    """In-memory helper (tests, benchmarks): the pairs ``(i, j)``, i < j, that MinHash-LSH puts in one cluster."""
    import os
    import tempfile

    hasher = MinHasher(params)
    width = params.bands * (1 + params.rows)
    keys = np.stack([hasher.record(t) for t in texts]) if texts else np.zeros((0, width), np.uint64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(os.path.join(tmp, "keys.npy"))
        np.save(path, keys)
        roots = cluster_roots([path], params.bands, params.threshold)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        groups.setdefault(r, []).append(i)
    return {(a, b) for g in groups.values() for k, a in enumerate(g) for b in g[k + 1 :]}
