"""Corpus-wide repeated-line removal (lmforge/data/linededup.py) on real Sphinx pages and hand-written text."""

from __future__ import annotations

from collections import Counter

import numpy as np

from lmforge.data.documents import Document
from lmforge.data.io import iter_documents
from lmforge.data.linededup import (
    HashCounter,
    LineDedupParams,
    RepeatedLineRemoval,
    frequent_hashes,
    normalize_unit,
)
from lmforge.data.stage import Config, run

from test_data import DAODEJING, DEMO, check_conservation, hamlet_scene, pipeline

FOOTER = "© Copyright 2001-2026, Python Software Foundation."
NAV = ("Navigation", "• modules |", "Previous topic", "Created using Sphinx 5.3.0.")


def test_normalize_unit_like_ccnet():
    assert normalize_unit("  © Copyright 2001-2026,   Python!  ") == normalize_unit("copyright 1999-2024 python")
    assert normalize_unit("• | »") == ""  # punctuation only: never counted nor removed


def test_frequent_hashes_merge_shards_by_range(tmp_path):
    rng = np.random.default_rng(0)
    vocab = np.arange(1, 60, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # spread over the 64-bit range
    docs = [rng.choice(vocab, size=8, replace=False) for _ in range(90)]
    truth: Counter = Counter()
    paths = []
    for shard in range(3):
        c = HashCounter()
        for d in docs[shard::3]:
            c.add(np.sort(d))
            truth.update(int(x) for x in d)
        table = c.table()
        assert (table[1:, 0] > table[:-1, 0]).all()  # sorted, distinct
        paths.append(tmp_path / f"{shard}.npy")
        np.save(paths[-1], table)
    for max_docs in (5, 12, 20):
        want = sorted(h for h, n in truth.items() if n > max_docs)
        assert want
        for buckets in (1, 7, 16):
            assert frequent_hashes(paths, max_docs, buckets).tolist() == want


def test_removes_frequent_lines_keeps_the_rest_and_drops_short_docs():
    params = LineDedupParams("line", max_docs=2, min_words=20)
    boiler = "Accept all cookies\nSkip to main content"
    speeches = [p for p in hamlet_scene().split("\n\n") if len(p.split()) > 30][:3]
    assert len(speeches) == 3
    texts = [f"{boiler}\n{p}\n{FOOTER}" for p in speeches] + [f"{boiler}\nHome page.\n{FOOTER}"]
    texts.append(DAODEJING)  # no boilerplate: untouched
    counts: Counter = Counter()
    for t in texts:
        counts.update(params.hashes(t).tolist())
    frequent = np.array(sorted(h for h, n in counts.items() if n > params.max_docs), dtype=np.uint64)
    step = RepeatedLineRemoval(frequent, params)
    out = pipeline([Document(f"d{i}", t, {}) for i, t in enumerate(texts)], step)
    for d in out[:-2]:
        assert not d.dropped and "cookies" not in d.text and FOOTER not in d.text
        assert d.meta["repeated_units_removed"] == 3
    assert out[-2].meta["drop_reason"] == "too_short_after_line_dedup"
    assert not out[-1].dropped and out[-1].text == DAODEJING and "repeated_units_removed" not in out[-1].meta
    assert step.stats.tallies["removed"]["line"] == 3 * (len(texts) - 1)
    assert step.stats.tallies["top_removed"]["Accept all cookies"] == len(texts) - 1
    step.stats.check()


def test_paragraph_unit_and_chinese():
    params = LineDedupParams("paragraph", max_docs=1, min_words=10)
    notice = "本网站使用cookie。继续浏览即表示同意。"
    texts = [f"{notice}\n\n{DAODEJING}", f"{DAODEJING[:60]}\n\n{notice}", "A single short paragraph."]
    counts: Counter = Counter()
    for t in texts:
        counts.update(params.hashes(t).tolist())
    frequent = np.array(sorted(h for h, n in counts.items() if n > 1), dtype=np.uint64)
    out = pipeline([Document(f"z{i}", t, {}) for i, t in enumerate(texts)], RepeatedLineRemoval(frequent, params))
    assert out[0].text == DAODEJING  # the notice paragraph and its separator are gone; CJK characters count as words
    assert not out[1].dropped and out[1].text == DAODEJING[:60]
    assert out[2].text == texts[2]


def test_stage_removes_sphinx_boilerplate_across_shards(tmp_path):
    """Full-page text of the demo's Python docs pages: nav bars and footers repeat on every page."""
    cfg = Config(inputs=[str(DEMO / "html")], main_content=False, langid=False, gopher_repetition=False,
                 line_dedup=True, shards=3)
    m = run(cfg, tmp_path / "out")
    stats = check_conservation(tmp_path / "out")
    names = [s["name"] for s in stats["steps"]]
    assert names.index("line_dedup_v1") == names.index("exact_dedup_v1") - 1
    assert m.metrics["steps"] == names
    step = stats["steps"][names.index("line_dedup_v1")]
    assert step["tallies"]["removed"]["line"] > 10 * step["in"] // 2
    assert step["tallies"]["top_removed"][FOOTER] >= step["in"] - step["dropped"].get("too_short_after_line_dedup", 0)
    kept = list(iter_documents(tmp_path / "out"))
    assert len(kept) >= 10
    for d in kept:
        lines = set(d["text"].split("\n"))
        assert FOOTER not in lines and not lines & set(NAV), d["id"]
        assert d["meta"]["repeated_units_removed"] >= 5
    copy_page = [d for d in kept if d["meta"]["url"].endswith("library/copy.html")]
    assert copy_page and "Return a deep copy of x." in copy_page[0]["text"]  # the page's own text stays
    assert not list((tmp_path / "out" / "work").glob("*.lines.npy"))  # work files are cleaned up


def test_crash_after_counting_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from lmforge.data import executor

    cfg = Config(inputs=[str(DEMO / "html" / "library"), str(DEMO / "html" / "faq"), str(DEMO / "html" / "howto")],
                 main_content=False, langid=False, gopher_repetition=False, line_dedup=True, line_dedup_max_docs=5,
                 shards=3)
    run(cfg, tmp_path / "whole")

    real = executor.global_pass

    def crash(*a, **kw):
        raise KeyboardInterrupt("killed after phase 1")

    monkeypatch.setattr(executor, "global_pass", crash)
    try:
        run(cfg, tmp_path / "resumed")
    except KeyboardInterrupt:
        pass
    assert len(list((tmp_path / "resumed" / "work").glob("*.lines.npy"))) == 3  # the counts survive the crash
    monkeypatch.setattr(executor, "global_pass", real)
    m = run(cfg, tmp_path / "resumed")
    assert m.metrics["shards_resumed"] == 3
    for i in range(3):
        name = f"part-{i:05d}.jsonl.zst"
        assert (tmp_path / "whole" / "docs" / name).read_bytes() == (tmp_path / "resumed" / "docs" / name).read_bytes()
