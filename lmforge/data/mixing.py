"""Domains and mixtures: tag each document with a domain, keep the top fraction by a score, and resample the corpus
to target proportions per domain or language.

``domain_tag_v1`` (a per-shard step) puts ``meta.domain`` on every document: the first URL-host rule that matches
(``docs.python.org`` → ``code_docs``), else the keyword domain with the most keyword hits per 1,000 words (at least
``min_hits`` hits), else ``other``.  It never drops.

``select_v1`` and ``mix_v1`` need the whole corpus to decide (a quantile, a group size), so they run as one more
pass over the finished ``docs/`` shards (:func:`select_pass`):

1. read ``meta`` of every kept document; per group (``meta.domain`` or ``meta.lang``) collect a deterministic
   uniform number ``u = hash(id)`` in [0, 1) (8 bytes per document);
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


def _copies(u: float, n: int, target: int, cut: float) -> int:
    """Copies of a document with uniform ``u`` in a group of ``n`` that should give ``target`` documents; ``cut`` is
    the u-threshold of the ``target mod n`` documents that get one more copy."""
    base = target // n
    return base + (1 if u < cut else 0)


def _cut(us: np.ndarray, k: int) -> float:
    """The threshold below which exactly ``k`` of ``us`` lie (ties are measure-zero for 64-bit hashes)."""
    if k <= 0:
        return -1.0
    if k >= len(us):
        return 2.0
    return float(np.partition(us, k)[k])


def select_pass(out_dir: Path, shard_names: list[str], spec: MixSpec) -> dict[str, Any]:
    """Rewrite ``docs/<shard>.jsonl.zst`` in place after top-fraction selection and mixing; dropped documents go to
    ``dropped/select-<shard>.jsonl.zst``.  Returns the step stats (``select_v1`` and/or ``mix_v1``) and the counts
    written."""
    from lmforge.data.io import ShardWriter, iter_jsonl

    def on_error(reason: str, line: int | None, detail: str) -> None:
        raise RuntimeError(f"{out_dir}/docs line {line}: {reason} {detail} (re-run with force)")

    # pass 1: scores, groups and uniforms of every kept document, in shard order
    scores: list[float] = []
    groups: list[str] = []
    us: list[float] = []
    for name in shard_names:
        for _, rec in iter_jsonl(out_dir / "docs" / f"{name}.jsonl.zst", on_error):
            meta = rec.get("meta") or {}
            if spec.top_fraction is not None:
                s = meta.get(spec.score_key)
                if not isinstance(s, (int, float)):
                    raise ValueError(f"select: document {rec.get('id')!r} has no numeric meta.{spec.score_key} "
                                     f"(run the step that scores it, e.g. quality_model)")
                scores.append(float(s))
            groups.append(group_of(meta, spec.by))
            us.append(uniform(str(rec.get("id")), spec.seed))
    n = len(us)
    keep = np.ones(n, dtype=bool)
    steps: list[StepStats] = []
    sel = StepStats("select_v1")
    if spec.top_fraction is not None:
        arr = np.asarray(scores)
        k = int(np.ceil(spec.top_fraction * n))
        if k < n:
            # rank by score (high first), ties by u: exactly k documents stay
            order = np.lexsort((np.asarray(us), -arr))
            keep[:] = False
            keep[order[:k]] = True
        threshold = float(arr[keep].min()) if keep.any() else None
        sel.docs_in, sel.kept = n, int(keep.sum())
        if n - sel.kept:
            sel.dropped["select_low"] = n - sel.kept
        sel.tally("threshold", f"{spec.score_key} >= {threshold}")
        steps.append(sel)

    copies = keep.astype(np.int64)
    mix = StepStats("mix_v1")
    if spec.targets:
        g_arr = np.asarray(groups, dtype=object)
        u_arr = np.asarray(us)
        sizes = Counter(g for g, k_ in zip(groups, keep) if k_)
        plan = plan_copies(dict(sizes), spec.targets, spec.max_repeat)
        for g, size in sizes.items():
            idx = np.flatnonzero(keep & (g_arr == g))
            t = plan[g]
            cut = _cut(u_arr[idx], t % size)
            copies[idx] = [_copies(float(u), size, t, cut) for u in u_arr[idx]]
            mix.tally("group_in", g, size)
            mix.tally("group_out", g, int(copies[idx].sum()))
        mix.docs_in = int(keep.sum())
        mix.kept = int((copies > 0).sum())
        for g in sizes:
            idx = np.flatnonzero(keep & (g_arr == g) & (copies == 0))
            if idx.size:
                known = g in spec.targets or "*" in spec.targets
                mix.dropped["mix_downsampled" if known else "mix_no_target"] += int(idx.size)
        total_out = int(copies.sum())
        for g, c in mix.tallies.get("group_out", {}).items():
            mix.tally("share_permille", g, int(round(1000 * c / total_out)) if total_out else 0)
        steps.append(mix)

    # pass 2: rewrite the shards (the writer renames its temporary file over the source only when it is closed)
    from lmforge.data.executor import EXAMPLES_PER_REASON, Profile, _example

    profile = Profile()
    examples: dict[str, list[dict[str, Any]]] = {}
    i = 0
    written = written_bytes = 0
    for name in shard_names:
        src = out_dir / "docs" / f"{name}.jsonl.zst"
        with ShardWriter(src) as w, ShardWriter(out_dir / "dropped" / f"select-{name}.jsonl.zst") as drop:
            for _, rec in iter_jsonl(src, on_error):
                c = int(copies[i])
                doc = Document.from_dict(rec)
                if c == 0:
                    if not keep[i]:
                        doc.drop("select_v1", "select_low")
                    else:
                        known = groups[i] in spec.targets or "*" in spec.targets
                        doc.drop("mix_v1", "mix_downsampled" if known else "mix_no_target")
                    drop.write(doc)
                    ex = examples.setdefault(doc.meta["drop_reason"], [])
                    if len(ex) < EXAMPLES_PER_REASON:
                        ex.append(_example(doc))
                for k in range(c):
                    w.write(rec if k == 0 else {**rec, "id": f"{rec['id']}#rep{k}"})
                    profile.add(doc)
                i += 1
            written += w.count
            written_bytes += w.text_bytes
    for s in steps:
        s.check()
    return {"steps": [s.to_dict(full=True) for s in steps], "written": written, "written_bytes": written_bytes,
            "kept": int((copies > 0).sum()), "copies_added": int(copies.sum() - (copies > 0).sum()),
            "profile": profile.to_dict(), "examples": examples}
