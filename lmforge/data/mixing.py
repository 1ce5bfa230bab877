"""Domains and mixtures: tag each document with a domain, keep the top fraction by a score, and resample the corpus
to target proportions per domain or language.

``domain_tag_v1`` (a per-shard step) puts ``meta.domain`` on every document: the first URL-host rule that matches
(``docs.python.org`` → ``code_docs``), else the keyword domain with the most keyword hits per 1,000 words (at least
``min_hits`` hits), else ``other``.  It never drops.

``select_v1`` and ``mix_v1`` need the whole corpus to decide (a quantile, a group size), so they run as one more
pass over the finished ``docs/`` shards (:func:`select_pass`), as per-shard tasks the executor maps (locally or as
Ray tasks); the driver only merges small summaries (counts per group, 256 counters per shard and round of the radix
select that finds a quantile):

1. read ``meta`` of every kept document; per group (``meta.domain`` or ``meta.lang``) a deterministic
   uniform number ``u = hash(id)`` in [0, 1);
2. ``top_fraction``: keep the documents whose score (e.g. ``meta.quality``) is in the top fraction (``select_low``);
3. ``mix``: with ``n_g`` documents and target share ``p_g`` per group, the output has ``N = min_g n_g·R/p_g``
   documents (``R`` = ``max_repeat``, 1 = only down-sampling), so group g gets ``t_g = p_g·N``: every document is
   written ``floor(t_g/n_g)`` times and the ``t_g mod n_g`` documents with the smallest ``u`` once more; a document
   with zero copies is dropped (``mix_downsampled``), a group without a target is dropped (``mix_no_target``) unless
   the targets have a ``"*"`` entry for all other groups.  Extra copies get ids ``<id>#rep<k>``.

The step stats record per group the documents in, out (copies included) and the achieved share.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from lmforge.data.documents import Document
from lmforge.data.steps import Step, StepStats

# host suffix → domain (the first match wins; a leading "." matches a top-level domain)
DEFAULT_HOST_RULES: dict[str, str] = {
    "wikipedia.org": "encyclopedia",
    "docs.python.org": "code_docs",
    "djangoproject.com": "code_docs",
    "readthedocs.io": "code_docs",
    "github.com": "code",
    "stackoverflow.com": "qa",
    "stackexchange.com": "qa",
    "arxiv.org": "science",
    "gutenberg.org": "books",
    "bbc.co.uk": "news",
    "reuters.com": "news",
    "nytimes.com": "news",
    ".gov": "government",
    ".edu": "education",
}
# keyword domain → words (lower case; whole-word matches)
DEFAULT_KEYWORDS: dict[str, list[str]] = {
    "code_docs": ["function", "module", "class", "method", "argument", "parameter", "returns", "import", "python",
                  "django", "api", "exception", "attribute", "default", "object", "string", "integer", "syntax"],
    "religion": ["lord", "god", "thou", "thee", "thy", "unto", "shalt", "israel", "jesus", "heaven", "holy", "faith",
                 "prayer", "sin", "spirit"],
    "literature": ["king", "queen", "lady", "lord", "sir", "love", "death", "heart", "enter", "exit", "exeunt", "act",
                   "scene", "o", "doth", "hath"],
    "news": ["said", "government", "minister", "president", "police", "reported", "election", "percent", "officials",
             "market", "yesterday"],
    "science": ["theorem", "equation", "experiment", "hypothesis", "data", "results", "analysis", "model", "measured",
                "cell", "protein", "energy"],
}
_WORD = re.compile(r"[^\W\d_]+")


class DomainTag(Step):
    """``meta.domain`` from URL-host rules, else keyword rules, else ``other``; ``meta.domain_by`` says which."""

    name = "domain_tag_v1"

    def __init__(self, host_rules: dict[str, str] | None = None, keywords: dict[str, list[str]] | None = None,
                 min_hits: int = 5, min_per_1000: float = 20.0) -> None:
        super().__init__()
        self.host_rules = list((DEFAULT_HOST_RULES if host_rules is None else host_rules).items())
        kw = DEFAULT_KEYWORDS if keywords is None else keywords
        self.word_domains: dict[str, list[str]] = {}
        for domain, ws in kw.items():
            for w in ws:
                self.word_domains.setdefault(w.lower(), []).append(domain)
        self.min_hits = min_hits
        self.min_per_1000 = min_per_1000

    def host_domain(self, url: str | None) -> str | None:
        if not url:
            return None
        host = (urlsplit(url).hostname or "").lower()
        if not host:
            return None
        for suffix, domain in self.host_rules:
            if suffix.startswith("."):
                if host.endswith(suffix):
                    return domain
            elif host == suffix or host.endswith("." + suffix):
                return domain
        return None

    def keyword_domain(self, text: str) -> tuple[str | None, dict[str, int]]:
        """The keyword domain with the most hits (ties: the first in the rule order), and the hits per domain."""
        toks = _WORD.findall(text.lower())
        hits: Counter[str] = Counter()
        for w, c in Counter(toks).items():
            for domain in self.word_domains.get(w, ()):
                hits[domain] += c
        if not hits:
            return None, {}
        order = {d: i for i, d in enumerate(dict.fromkeys(d for ds in self.word_domains.values() for d in ds))}
        best, n = min(hits.items(), key=lambda kv: (-kv[1], order[kv[0]]))
        per_1000 = n * 1000 / max(len(toks), 1)
        if n < self.min_hits or per_1000 < self.min_per_1000:
            return None, dict(hits)
        return best, dict(hits)

    def process(self, doc: Document) -> Document:
        domain = self.host_domain(doc.meta.get("url"))
        by = "host"
        if domain is None:
            domain, _ = self.keyword_domain(doc.text)
            by = "keywords"
        if domain is None:
            domain, by = "other", "none"
        doc.meta["domain"] = domain
        doc.meta["domain_by"] = by
        self.stats.tally("domain", domain)
        return doc


# ----------------------------------------------------------------------------------------------------------------------
# corpus-level selection and mixing


def uniform(doc_id: str, seed: int = 0) -> float:
    """A deterministic number in [0, 1) for a document id."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def group_of(meta: dict[str, Any], key: str) -> str:
    v = meta.get(key)
    return "unknown" if v is None else str(v)


@dataclass
class MixSpec:
    """What :func:`select_pass` does: keep the top fraction by a meta score, then resample groups to target shares."""

    top_fraction: float | None = None
    score_key: str = "quality"
    by: str = "domain"
    targets: dict[str, float] = field(default_factory=dict)
    max_repeat: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if any(v < 0 for v in self.targets.values()) or (self.targets and sum(self.targets.values()) <= 0):
            raise ValueError(f"mix targets must be non-negative with a positive sum, got {self.targets}")
        if self.max_repeat < 1:
            raise ValueError(f"max_repeat must be >= 1, got {self.max_repeat}")

    @property
    def active(self) -> bool:
        return self.top_fraction is not None or bool(self.targets)


def plan_copies(sizes: dict[str, int], targets: dict[str, float], max_repeat: float = 1.0) -> dict[str, int]:
    """Documents to write per group so the shares follow ``targets`` (normalised over the groups present, with
    ``"*"`` standing for every group not named): ``t_g = p_g · N`` with ``N = min_g n_g · max_repeat / p_g``."""
    shares: dict[str, float] = {}
    for g, n in sizes.items():
        p = targets.get(g, targets.get("*", 0.0))
        if n > 0 and p > 0:
            shares[g] = p
    if not shares:
        return {g: 0 for g in sizes}
    total = sum(shares.values())
    shares = {g: p / total for g, p in shares.items()}
    n_out = min(sizes[g] * max_repeat / p for g, p in shares.items())
    return {g: int(round(shares.get(g, 0.0) * n_out)) for g in sizes}


# The pass runs as tasks any executor maps (in this process, or as Ray tasks), the driver merging small summaries:
#   1. scan_shard(i): read docs/<shard>; write each document's score, u and group to work/<shard>.select.npz; return
#      its count, groups and lowest score;
#   2. the quantiles: the document at a given rank of the whole corpus (the last one kept by top_fraction; per group
#      the u below which documents get one more copy) by a radix select over 128-bit keys: each round every shard
#      counts its documents per next byte under the prefix found so far (256 counters), until few enough remain to
#      fetch them (rank_members) and sort them on the driver;
#   3. apply_shard(i): rewrite docs/<shard> with the decisions; return counts, examples and the profile.
# The ranks are those of one sort of the whole corpus (score high first, then u, then shard and position), so the
# result is the same as ranking every document on one machine.

RANK_FETCH = 4096  # a prefix matching at most this many documents: fetch them instead of another round


@dataclass
class SelectPlan:
    """What a select / mix task is handed (by value): the spec and the decisions the driver has made so far."""

    out_dir: str
    shard_names: list[str]
    spec: MixSpec
    cut: tuple[int, int, int, int] | None = None  # select: the last kept document (rank key, shard, position)
    copies: dict[str, tuple[int, float]] = field(default_factory=dict)  # mix: group → (copies each, u cut for +1)

    def docs(self, i: int) -> Path:
        return Path(self.out_dir) / "docs" / f"{self.shard_names[i]}.jsonl.zst"

    def table(self, i: int) -> Path:
        return Path(self.out_dir) / "work" / f"{self.shard_names[i]}.select.npz"


def _on_error(src: Path) -> Any:
    def on_error(reason: str, line: int | None, detail: str) -> None:
        raise RuntimeError(f"{src} line {line}: {reason} {detail} (re-run with force)")

    return on_error


def _ordered(x: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like the floats ``x`` (NaN above everything)."""
    bits = (np.asarray(x, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0: -0.0 sorts with 0.0
    keys = np.where(bits >> np.uint64(63) == 1, ~bits, bits | np.uint64(1 << 63))
    return np.where(np.isnan(x), np.uint64(2**64 - 1), keys)


def _score_key(score: np.ndarray) -> np.ndarray:
    """uint64 keys that sort high scores first (NaN last, as in a sort by -score)."""
    keys = ~_ordered(score)
    keys[np.isnan(score)] = np.uint64(2**64 - 1)
    return keys


def scan_shard(plan: SelectPlan, i: int) -> dict[str, Any]:
    """Step 1 for shard ``i``: its table of scores, uniforms and groups, and a summary."""
    from lmforge.artifacts import atomic_path
    from lmforge.data.io import iter_jsonl

    spec = plan.spec
    scores: list[float] = []
    groups: list[str] = []
    us: list[float] = []
    src = plan.docs(i)
    for _, rec in iter_jsonl(src, _on_error(src)):
        meta = rec.get("meta") or {}
        if spec.top_fraction is not None:
            sc = meta.get(spec.score_key)
            if not isinstance(sc, (int, float)):
                raise ValueError(f"select: document {rec.get('id')!r} has no numeric meta.{spec.score_key} "
                                 f"(run the step that scores it, e.g. quality_model)")
            scores.append(float(sc))
        groups.append(group_of(meta, spec.by))
        us.append(uniform(str(rec.get("id")), spec.seed))
    with atomic_path(plan.table(i)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, score=np.asarray(scores, np.float64), u=np.asarray(us, np.float64),
                     group=np.asarray(groups, dtype=str))
    return {"n": len(us), "groups": Counter(groups), "min_score": min(scores) if scores else None}


def _keys(plan: SelectPlan, i: int, which: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rank keys (hi, lo), uniforms and positions of shard ``i``'s documents in one ranking: ``which`` None is
    the top-fraction ranking (score high first, then u), a group name that group's kept documents by u."""
    t = np.load(plan.table(i))
    n = len(t["u"])
    pos = np.arange(n, dtype=np.uint64)
    if which is None:
        return _score_key(t["score"]), _ordered(t["u"]), t["score"], pos
    sel = kept_by_select(plan, i, t) & (t["group"] == which)
    return _ordered(t["u"][sel]), np.zeros(int(sel.sum()), np.uint64), t["u"][sel], pos[sel]


def kept_by_select(plan: SelectPlan, i: int, t: Any = None) -> np.ndarray:
    """Which documents of shard ``i`` the top-fraction cut keeps (all when there is no cut)."""
    t = np.load(plan.table(i)) if t is None else t
    if plan.cut is None:
        return np.ones(len(t["u"]), dtype=bool)
    hi, lo = _score_key(t["score"]), _ordered(t["u"])
    ch, cl, cs, cp = (np.uint64(v) for v in plan.cut)
    pos = np.arange(len(hi), dtype=np.uint64)
    return (hi < ch) | ((hi == ch) & ((lo < cl) | ((lo == cl) & ((np.uint64(i) < cs) | ((np.uint64(i) == cs)
                                                                                          & (pos <= cp))))))


def _digit(hi: np.ndarray, lo: np.ndarray, k: int) -> np.ndarray:
    word, shift = (hi, 56 - 8 * k) if k < 8 else (lo, 56 - 8 * (k - 8))
    return ((word >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64)


def _under(hi: np.ndarray, lo: np.ndarray, prefix: list[int]) -> np.ndarray:
    mask = np.ones(len(hi), dtype=bool)
    for k, d in enumerate(prefix):
        mask &= _digit(hi, lo, k) == d
    return mask


def rank_counts(plan: SelectPlan, i: int, which: str | None, prefix: list[int]) -> np.ndarray:
    """Shard ``i``'s documents under the key prefix, counted per next byte (256 counters)."""
    hi, lo, _, _ = _keys(plan, i, which)
    m = _under(hi, lo, prefix)
    return np.bincount(_digit(hi[m], lo[m], len(prefix)), minlength=256)


def rank_members(plan: SelectPlan, i: int, which: str | None, prefix: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Shard ``i``'s documents under the key prefix: rows (hi, lo, shard, position) and their score (or u)."""
    hi, lo, value, pos = _keys(plan, i, which)
    m = _under(hi, lo, prefix)
    rows = np.column_stack([hi[m], lo[m], np.full(int(m.sum()), i, np.uint64), pos[m]])
    return rows, value[m]


def document_at_rank(mapper: Any, plan: SelectPlan, which: str | None, rank: int, total: int) -> tuple[tuple, float]:
    """The key and score (or u) of the document at ``rank`` (0 = first) among ``total`` in a ranking, over all
    shards; each round the driver sums 256 counters per shard."""
    shards = range(len(plan.shard_names))
    prefix: list[int] = []
    count = total
    while count > RANK_FETCH and len(prefix) < 16:
        counts = np.sum(mapper(rank_counts, [(plan, i, which, prefix) for i in shards]), axis=0)
        cum = np.cumsum(counts)
        d = int(np.searchsorted(cum, rank, side="right"))
        rank -= int(cum[d - 1]) if d else 0
        count = int(counts[d])
        prefix.append(d)
    found = mapper(rank_members, [(plan, i, which, prefix) for i in shards])
    rows = np.concatenate([r for r, _ in found])
    values = np.concatenate([v for _, v in found])
    order = np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))
    k = order[rank]
    return tuple(int(x) for x in rows[k]), float(values[k])


def group_sizes(plan: SelectPlan, i: int) -> Counter:
    """Shard ``i``'s documents kept by the top-fraction cut, per group."""
    t = np.load(plan.table(i))
    return Counter(t["group"][kept_by_select(plan, i, t)].tolist())


def apply_shard(plan: SelectPlan, i: int) -> dict[str, Any]:
    """Step 3 for shard ``i``: rewrite ``docs/`` (extra copies get ids ``<id>#rep<k>``), dropped documents to
    ``dropped/select-``; return the counts, examples and profile (the writer renames its temporary file over the
    source only when it is closed)."""
    from lmforge.data.executor import EXAMPLES_PER_REASON, Profile, _example
    from lmforge.data.io import ShardWriter, iter_jsonl

    spec = plan.spec
    t = np.load(plan.table(i))
    keep = kept_by_select(plan, i, t)
    groups = t["group"].tolist()
    copies = keep.astype(np.int64)
    for g, (base, cut) in plan.copies.items():
        sel = keep & (t["group"] == g)
        copies[sel] = base + (t["u"][sel] < cut)
    out_dir = Path(plan.out_dir)
    name = plan.shard_names[i]
    profile = Profile()
    examples: dict[str, list[dict[str, Any]]] = {}
    group_out: Counter = Counter()
    mix_dropped: Counter = Counter()
    src = plan.docs(i)
    with ShardWriter(src) as w, ShardWriter(out_dir / "dropped" / f"select-{name}.jsonl.zst") as drop:
        for k, (_, rec) in enumerate(iter_jsonl(src, _on_error(src))):
            c = int(copies[k])
            doc = Document.from_dict(rec)
            if keep[k]:
                group_out[groups[k]] += c
            if c == 0:
                if not keep[k]:
                    doc.drop("select_v1", "select_low")
                else:
                    known = groups[k] in spec.targets or "*" in spec.targets
                    doc.drop("mix_v1", "mix_downsampled" if known else "mix_no_target")
                    mix_dropped[doc.meta["drop_reason"]] += 1
                drop.write(doc)
                ex = examples.setdefault(doc.meta["drop_reason"], [])
                if len(ex) < EXAMPLES_PER_REASON:
                    ex.append(_example(doc))
            for r in range(c):
                w.write(rec if r == 0 else {**rec, "id": f"{rec['id']}#rep{r}"})
                profile.add(doc)
    return {"written": w.count, "written_bytes": w.text_bytes, "selected": int(keep.sum()),
            "kept": int((copies > 0).sum()), "copies": int(copies.sum()), "group_out": group_out,
            "mix_dropped": mix_dropped, "examples": examples, "profile": profile.to_dict()}


def select_pass(out_dir: Path, shard_names: list[str], spec: MixSpec, mapper: Any = None) -> dict[str, Any]:
    """Top-fraction selection and mixing over the finished ``docs/`` shards, rewritten in place, as tasks run by
    ``mapper`` (``mapper(fn, [args, ...])``; one after the other here by default).  Returns the step stats
    (``select_v1`` and/or ``mix_v1``) and the counts written."""
    from lmforge.data.executor import EXAMPLES_PER_REASON, local_map

    mapper = mapper or local_map
    plan = SelectPlan(str(out_dir), list(shard_names), spec)
    shards = range(len(shard_names))
    (Path(out_dir) / "work").mkdir(parents=True, exist_ok=True)
    scans = mapper(scan_shard, [(plan, i) for i in shards])
    n = sum(sc["n"] for sc in scans)
    steps: list[StepStats] = []
    sel = StepStats("select_v1")
    selected = n
    if spec.top_fraction is not None:
        k = int(np.ceil(spec.top_fraction * n))
        threshold: float | None = None
        if k < n:
            plan.cut, threshold = document_at_rank(mapper, plan, None, k - 1, n)
            selected = k
        elif n:
            threshold = float(np.min([sc["min_score"] for sc in scans if sc["min_score"] is not None]))
        sel.docs_in, sel.kept = n, selected
        if n - selected:
            sel.dropped["select_low"] = n - selected
        sel.tally("threshold", f"{spec.score_key} >= {threshold}")
        steps.append(sel)

    mix = StepStats("mix_v1")
    if spec.targets:
        sizes: Counter = Counter()
        for c in (mapper(group_sizes, [(plan, i) for i in shards]) if plan.cut else [sc["groups"] for sc in scans]):
            sizes.update(c)
        targets = plan_copies(dict(sizes), spec.targets, spec.max_repeat)
        for g, size in sizes.items():
            t, extra = targets[g], targets[g] % size
            cut = -1.0 if extra == 0 else document_at_rank(mapper, plan, g, extra, size)[1]
            plan.copies[g] = (t // size, cut)
            mix.tally("group_in", g, size)
        mix.docs_in = selected
        steps.append(mix)

    results = mapper(apply_shard, [(plan, i) for i in shards])
    examples: dict[str, list[dict[str, Any]]] = {}
    tables: dict[str, Counter] = {}
    for r in results:  # in shard order: the first examples and first-seen keys as one sequential pass has them
        for reason, exs in r["examples"].items():
            have = examples.setdefault(reason, [])
            have.extend(exs[: EXAMPLES_PER_REASON - len(have)])
        for table, counts in r["profile"].items():
            tables.setdefault(table, Counter()).update(counts)
    kept = sum(r["kept"] for r in results)
    copies = sum(r["copies"] for r in results)
    if spec.targets:
        mix.kept = kept
        for r in results:
            mix.dropped.update(r["mix_dropped"])
            for g, c in r["group_out"].items():
                mix.tally("group_out", g, c)
        total_out = copies
        for g, c in mix.tallies.get("group_out", {}).items():
            mix.tally("share_permille", g, int(round(1000 * c / total_out)) if total_out else 0)
    for s in steps:
        s.check()
    for i in shards:
        plan.table(i).unlink(missing_ok=True)
    return {"steps": [s.to_dict(full=True) for s in steps], "written": sum(r["written"] for r in results),
            "written_bytes": sum(r["written_bytes"] for r in results), "kept": kept, "copies_added": copies - kept,
            "profile": {k: dict(v) for k, v in tables.items()}, "examples": examples}
