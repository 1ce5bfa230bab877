"""Domain tagging, top-fraction selection and mixing to target shares (data stage)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.documents import Document
from lmforge.data.io import iter_documents
from lmforge.data.mixing import DomainTag, MixSpec, plan_copies, uniform
from lmforge.data.stage import Config, run

from test_data import DAODEJING, DEMO, check_conservation, hamlet_scene, pipeline


def kjv(book: str) -> str:
    return (DEMO / "books" / f"kjv-{book}.txt").read_text()


def test_domain_tag_host_then_keywords_then_other():
    docs = [
        Document("py", "Anything at all.", {"url": "https://docs.python.org/3/library/copy.html"}),
        Document("gov", "Anything at all.", {"url": "http://www.census.gov/data"}),
        Document("ruth", kjv("ruth")[:6000], {"url": "http://example.org/ruth"}),  # no host rule: keywords
        Document("ham", hamlet_scene()[:6000], {}),
        Document("short", "The cat sat on the mat.", {}),
    ]
    step = DomainTag()
    out = pipeline(docs, step)
    assert [d.meta["domain"] for d in out] == ["code_docs", "government", "religion", "literature", "other"]
    assert [d.meta["domain_by"] for d in out] == ["host", "host", "keywords", "keywords", "none"]
    assert step.stats.kept == 5 and not step.stats.dropped
    assert DomainTag({"example.org": "demo"}).host_domain("https://sub.example.org/x") == "demo"
    assert DomainTag({"example.org": "demo"}).host_domain("https://notexample.org/x") is None


def test_plan_copies():
    assert plan_copies({"a": 100, "b": 50}, {"a": 0.5, "b": 0.5}) == {"a": 50, "b": 50}
    # up to 2 copies each: b is repeated to reach its share
    assert plan_copies({"a": 100, "b": 50}, {"a": 0.5, "b": 0.5}, max_repeat=2) == {"a": 100, "b": 100}
    # "*" covers every group not named; a group with no target gets nothing
    assert plan_copies({"en": 80, "zh": 10, "es": 10}, {"en": 0.8, "*": 0.1}) == {"en": 80, "zh": 10, "es": 10}
    assert plan_copies({"en": 80, "zh": 10, "es": 10}, {"en": 0.5, "zh": 0.5}) == {"en": 10, "zh": 10, "es": 0}
    with pytest.raises(ValueError, match="max_repeat"):
        MixSpec(targets={"a": 1}, max_repeat=0.5)
    assert uniform("doc-1") == uniform("doc-1") != uniform("doc-2")


def _corpus(tmp_path: Path) -> Path:
    """12 English (Hamlet) and 4 Chinese (Daodejing) documents, each with a hand-set score."""
    src = tmp_path / "in"
    src.mkdir()
    ham = hamlet_scene()
    with open(src / "docs.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"en{i}", "text": ham[i * 600 : i * 600 + 1500], "score": i / 12}) + "\n")
        for i in range(4):
            f.write(json.dumps({"id": f"zh{i}", "text": DAODEJING[i * 10 :] + DAODEJING[: i * 10], "score": 0.9})
                    + "\n")
    return src


def _cfg(src: Path, **kw) -> Config:
    return Config(inputs=[str(src)], shards=2, gopher_quality=False, gopher_repetition=False, **kw)


def test_stage_mixes_languages_to_target_shares(tmp_path):
    src = _corpus(tmp_path)
    cfg = _cfg(src, mix_by="lang", mix_targets={"en": 0.5, "zh": 0.5}, mix_max_repeat=3)
    m = run(cfg, tmp_path / "out")
    docs = list(iter_documents(tmp_path / "out"))
    langs = Counter(d["meta"]["lang"] for d in docs)
    # N = min(12·3/0.5, 4·3/0.5) = 24 → 12 English (all once) and 12 Chinese (each 3 times)
    assert langs == {"en": 12, "zh": 12}
    assert sum(d["id"].startswith("zh") and "#rep" in d["id"] for d in docs) == 8
    stats = check_conservation(tmp_path / "out")
    mix = stats["steps"][-1]
    assert mix["name"] == "mix_v1" and mix["in"] == 16 and mix["kept"] == 16
    assert mix["tallies"]["group_out"] == {"en": 12, "zh": 12}
    assert stats["totals"]["docs_written"] == 24 and stats["totals"]["copies_added"] == 8
    assert m.metrics["docs_written"] == 24
    assert "mix_v1" in (tmp_path / "out" / "report.html").read_text()

    # down-sampling only: English is cut to the Chinese count, deterministically
    cfg2 = _cfg(src, mix_by="lang", mix_targets={"en": 0.5, "zh": 0.5})
    ids = []
    for k in range(2):
        run(cfg2, tmp_path / f"down{k}")
        ids.append([d["id"] for d in iter_documents(tmp_path / f"down{k}")])
    assert ids[0] == ids[1]
    assert Counter(i[:2] for i in ids[0]) == {"en": 4, "zh": 4}
    stats = check_conservation(tmp_path / "down0")
    assert stats["dropped_by_reason"]["mix_downsampled"] == 8


def test_stage_keeps_top_fraction_by_score(tmp_path):
    src = _corpus(tmp_path)
    run(_cfg(src, top_fraction=0.25, select_score="score", langid=False), tmp_path / "out")
    kept = {d["id"] for d in iter_documents(tmp_path / "out")}
    # 16 documents → the top 4 by score: en11 (0.917), then 3 of the 4 Chinese ones (0.9; the tie is broken by a
    # hash of the id, so the same 3 on every run)
    assert len(kept) == 4 and "en11" in kept and len(kept & {"zh0", "zh1", "zh2", "zh3"}) == 3
    stats = check_conservation(tmp_path / "out")
    assert stats["dropped_by_reason"]["select_low"] == 12
    assert stats["steps"][-1]["tallies"]["threshold"] == {"score >= 0.9": 1}


def test_stage_select_needs_the_score(tmp_path):
    src = _corpus(tmp_path)
    with pytest.raises(ValueError, match="meta.quality"):
        run(_cfg(src, top_fraction=0.5, langid=False), tmp_path / "out")
