"""Tests of the data stage (lmforge/data) on real text from data/demo."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from lmforge.artifacts import read_manifest, write_json
from lmforge.data import executor
from lmforge.data.documents import Document
from lmforge.data.filters import WORD_RE, GopherQuality, GopherRepetition, NGrams
from lmforge.data.io import ShardWriter, iter_documents, iter_jsonl, iter_texts
from lmforge.data.readers import ReadLog, read_file
from lmforge.data.stage import Config, collect_inputs, run
from lmforge.data.steps import ExactDedup, HtmlExtract, UnicodeNormalize

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"

# Tao Te Ching, chapters 1-2 (public domain)
DAODEJING = (
    "道可道，非常道。名可名，非常名。無名天地之始；有名萬物之母。故常無欲，以觀其妙；常有欲，以觀其徼。"
    "此兩者，同出而異名，同謂之玄。玄之又玄，衆妙之門。\n\n"
    "天下皆知美之為美，斯惡已。皆知善之為善，斯不善已。故有無相生，難易相成，長短相較，高下相傾，音聲相和，"
    "前後相隨。是以聖人處無為之事，行不言之教；萬物作焉而不辭，生而不有，為而不恃，功成而弗居。夫唯弗居，是以不去。"
)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def pipeline(docs, *steps):
    for s in steps:
        docs = s(docs)
    return list(docs)


def filters():
    return [HtmlExtract(), UnicodeNormalize(), GopherRepetition(), GopherQuality()]


def read(path: Path, **kw) -> tuple[list[Document], ReadLog]:
    log = ReadLog()
    return list(read_file(path, log, **kw)), log


def hamlet_scene() -> str:
    text = (DEMO / "books" / "shakespeare-hamlet.txt").read_text()
    start = text.index("Scene II. Elsinore. A room of state in the Castle.")
    return text[start : text.index("Scene III.", start)]


# ----------------------------------------------------------------------------------------------------------------------
# steps


def test_genindex_page_is_dropped_and_real_page_kept():
    docs = [read(DEMO / "html" / name)[0][0] for name in ("genindex-J.html", "library/copy.html", "search.html")]
    out = pipeline(docs, *filters())
    by_source = {Path(d.meta["source"]).name: d for d in out}
    assert by_source["genindex-J.html"].dropped
    # a link list: its "( in" bigrams repeat, and it has few words
    assert by_source["genindex-J.html"].meta["drop_reason"] in ("top_2gram_frac", "too_few_words")
    assert by_source["search.html"].dropped
    copy = by_source["copy.html"]
    assert not copy.dropped
    assert "shallow and deep copy operations" in copy.text
    assert "<div" not in copy.text  # extracted, not markup
    assert copy.meta["title"].startswith("copy")
    assert copy.meta["url"] == "https://docs.python.org/3.11/library/copy.html"
    assert copy.meta["scores"]["words"] > 300


def test_shakespeare_scene_kept_with_scores():
    doc = Document("hamlet-1-2", hamlet_scene(), {"source": "hamlet"})
    (out,) = pipeline([doc], *filters())
    assert not out.dropped, out.meta
    s = out.meta["scores"]
    assert s["stop_words"] == 8 and s["words"] > 1000
    assert 3 <= s["mean_word_length"] <= 10


def test_chinese_text_not_dropped_by_word_rules():
    (out,) = pipeline([Document("ddj", DAODEJING, {})], UnicodeNormalize(), GopherRepetition(), GopherQuality())
    assert not out.dropped, out.meta
    assert out.meta["scores"]["words"] == len(re.findall(r"[\u4e00-\u9fff]", DAODEJING))  # one word per ideograph
    assert "stop_words" not in out.meta["scores"]  # an English-only rule, skipped for CJK
    assert WORD_RE.findall("道可道，非常道。") == ["道", "可", "道", "非", "常", "道"]
    # the same length rule still drops a short CJK snippet
    (short,) = pipeline([Document("x", DAODEJING[:20], {})], GopherQuality())
    assert short.meta["drop_reason"] == "too_few_words"


def test_repetition_filter_drops_psalm_136_refrain():
    text = gzip.decompress((DEMO / "books" / "kjv-psalms.txt.gz").read_bytes()).decode()
    start = text.index("\nChapter 136\n")
    psalm = text[start : text.index("\nChapter 137\n")]
    assert psalm.count("for his mercy endureth for ever") == 26
    (out,) = pipeline([Document("ps136", psalm, {})], GopherRepetition())
    assert out.dropped and out.meta["drop_reason"].startswith(("dup_", "top_"))
    (ok,) = pipeline([Document("ham", hamlet_scene(), {})], GopherRepetition())
    assert not ok.dropped


def _numpy_ngrams(words: list[str]) -> NGrams:
    old = NGrams.small
    NGrams.small = -1
    try:
        return NGrams(words)
    finally:
        NGrams.small = old


def test_ngram_stats_match_reference_walk():
    def ref_dup(words, n):
        seen, chars, i = set(), 0, 0
        while i < len(words) - n + 1:
            g = tuple(words[i : i + n])
            if g in seen:
                chars += sum(map(len, g))
                i += n
            else:
                seen.add(g)
                i += 1
        return chars

    rng = random.Random(0)
    vocab = "to be or not that is the question".split()
    def ref_top(words, n):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        counts = Counter(grams)
        c = max(counts.values(), default=0)
        if c <= 1:
            return 0
        first = next(g for g in grams if counts[g] == c)
        return (sum(map(len, first)) + n - 1) * c

    for make in (NGrams, _numpy_ngrams):  # the Python path (short lists) and the numpy path
        for _ in range(100):
            words = [rng.choice(vocab) for _ in range(rng.randint(0, 150))]
            g = make(words)
            assert g.py == (make is NGrams)
            for n in range(2, 5):
                assert g.top_chars(n) == ref_top(words, n)
            for n in range(5, 11):
                assert g.dup_chars(n) == ref_dup(words, n)
        g = make("a b a b a b c".split())
        assert g.top_chars(2) == 3 * 3  # "a b" three times, 3 characters each
        assert g.top_chars(4) == 7 * 2 and g.dup_chars(5) == 0


def test_unicode_normalize_fixes_mojibake_and_controls():
    doc = Document("m", "The Mona Lisa doesnâ€™t have eyebrows.\x00\u200b\r\nCafe\u0301   \n\n\n\nend", {})
    (out,) = pipeline([doc], UnicodeNormalize())
    assert out.text == "The Mona Lisa doesn’t have eyebrows.\nCafé\n\nend"
    (empty,) = pipeline([Document("e", "\u200b\x00 \n", {})], UnicodeNormalize())
    assert empty.meta["drop_reason"] == "empty_after_normalize"


def test_exact_dedup_normalises_case_and_whitespace():
    scene = hamlet_scene()
    docs = [Document("a", scene, {}), Document("b", scene.upper().replace("\n", "  \n"), {}),
            Document("c", scene[:-100], {})]
    step = ExactDedup()
    out = pipeline(docs, step)
    assert [d.dropped for d in out] == [False, True, False]
    assert out[1].meta["duplicate_of"] == "a" and out[1].meta["drop_reason"] == "exact_duplicate"
    assert step.stats.to_dict() == {"name": "exact_dedup_v1", "in": 3, "kept": 2, "dropped": {"exact_duplicate": 1}}


def test_dropped_docs_pass_later_steps_uncounted():
    docs = [Document("x", "<html><body><script>var x = 1;</script></body></html>", {"format": "html"}),
            Document("y", hamlet_scene(), {})]
    steps = filters()
    out = pipeline(docs, *steps)
    assert [d.dropped for d in out] == [True, False]
    assert out[0].meta["drop_reason"] == "html_no_text" and out[0].meta["drop_step"] == "html_extract_v1"
    for s in steps:
        s.stats.check()
    assert [s.stats.docs_in for s in steps] == [2, 1, 1, 1]  # the dropped page is not seen again


def test_trafilatura_missing_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "trafilatura", None)  # as if not installed: `import trafilatura` raises
    with pytest.raises(RuntimeError, match="pip install trafilatura"):
        HtmlExtract("trafilatura")
    with pytest.raises(RuntimeError, match="pip install trafilatura"):
        run(Config(inputs=[str(DEMO / "html" / "about.html")], extractor="trafilatura"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing started


# ----------------------------------------------------------------------------------------------------------------------
# readers


def test_warc_reader():
    docs, log = read(DEMO / "warc" / "django-docs.warc.gz")
    assert len(docs) == 36
    assert all(d.meta["url"].startswith("https://docs.djangoproject.com/en/3.2/") for d in docs)
    assert all(d.meta["format"] == "html" and d.id.startswith("urn:uuid:") for d in docs)
    assert docs[0].meta["offset"] > 0 and "warc_date" in docs[0].meta
    assert dict(log.skipped) == {"not_html": 1, "http_301": 1, "http_404": 1}
    assert not log.errors


def test_html_reader_and_txt_chunks():
    (doc,), _ = read(DEMO / "html" / "tutorial" / "appetite.html")
    assert doc.meta["url"] == "https://docs.python.org/3.11/tutorial/appetite.html"
    path = DEMO / "books" / "shakespeare-hamlet.txt"
    text = path.read_text()
    chunks, log = read(path, chunk_chars=20_000)
    assert len(chunks) > 5 and not log.errors
    assert all(len(c.text) >= 20_000 for c in chunks[:-1])
    assert re.sub(r"\s", "", "".join(c.text for c in chunks)) == re.sub(r"\s", "", text)
    lines = text.split("\n")
    for c in chunks:  # meta.line points at the chunk's first line
        assert c.text.startswith(lines[c.meta["line"] - 1])
    assert [c.id for c in read(path, chunk_chars=20_000)[0]] == [c.id for c in chunks]
    (whole,), _ = read(path, chunk_chars=0)
    assert whole.text == text


def test_jsonl_zst_reader():
    docs, log = read(DEMO / "jsonl" / "python-topics.jsonl.zst")
    assert len(docs) == 79 and not log.errors
    d = {x.id: x for x in docs}["pydoc-topic-if"]
    assert "if_stmt" in d.text and d.meta["topic"] == "if" and d.meta["line"] > 1


def test_unknown_format_is_listed_not_read():
    files, skipped = collect_inputs([str(DEMO)])
    assert [Path(p).name for p in skipped["unknown_format"]] == ["LICENSES.md"]
    assert all(f.name != "LICENSES.md" for f in files)


# ----------------------------------------------------------------------------------------------------------------------
# bad input


def test_truncated_gzip_keeps_docs_before_break():
    docs, log = read(DEMO / "broken" / "truncated-topics.jsonl.gz")
    assert len(docs) > 10 and log.errors == {"read_error:truncated_gzip": 1}
    full = [d.id for d in read(DEMO / "jsonl" / "python-topics.jsonl.zst")[0]]
    assert [d.id for d in docs] == full[: len(docs)]
    warc, log = read(DEMO / "broken" / "truncated-django.warc.gz")
    assert 0 < len(warc) < 36 and log.errors == {"read_error:truncated_gzip": 1}


def test_truncated_zstd_is_detected(tmp_path):
    lines = "".join(json.dumps({"id": i, "text": f"line {i} " * 50}) + "\n" for i in range(2000)).encode()
    blob = b"".join(zstandard.ZstdCompressor().compress(lines[i : i + 40_000]) for i in range(0, len(lines), 40_000))
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    docs, log = read(tmp_path / "cut.jsonl.zst")
    assert log.errors == {"read_error:truncated_zstd": 1}
    assert 0 < len(docs) < 2000 and [d.id for d in docs] == [str(i) for i in range(len(docs))]


def test_legacy_encoding_empty_and_malformed(capsys):
    docs, log = read(DEMO / "broken" / "sonnets-cp1252.txt")  # Windows-1252 is detected, and said so
    assert len(docs) == 1 and not log.errors and docs[0].meta["encoding"] == "cp1252"
    assert "beauty\u2019s rose" in docs[0].text
    docs, log = read(DEMO / "broken" / "empty.txt")
    assert docs == [] and log.errors == {"read_error:empty_file": 1}
    docs, log = read(DEMO / "broken" / "malformed-topics.jsonl")
    assert len(docs) == 20
    assert log.errors == {"read_error:malformed_json": 1, "read_error:missing_text": 1}
    err = capsys.readouterr().err.replace("\n", " ")
    assert "malformed-topics.jsonl:8" in err and "malformed-topics.jsonl:14" in err
    assert "empty.txt" in err


def test_stage_survives_broken_inputs(tmp_path, capsys):
    m = run(Config(inputs=[str(DEMO / "broken")], shards=2), tmp_path / "out")
    assert m.status == "done"
    assert m.metrics["read_errors_by_reason"] == {
        "read_error:empty_file": 1, "read_error:malformed_json": 1, "read_error:missing_text": 1,
        "read_error:truncated_gzip": 2,
    }
    assert m.metrics["docs_kept"] > 20
    err = capsys.readouterr().err.replace("\n", " ")
    assert "truncated-topics.jsonl.gz" in err and "malformed-topics.jsonl:8" in err


# ----------------------------------------------------------------------------------------------------------------------
# the stage: conservation, dedup across shards, resume


def check_conservation(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    expected = stats["read"]["docs"]
    for st in stats["steps"]:
        assert st["in"] == expected, st
        assert st["in"] + st.get("added", 0) == st["kept"] + sum(st["dropped"].values()), st
        expected = st["kept"]
    t = stats["totals"]
    assert t["docs_kept"] == expected
    assert t["docs_in"] + t.get("docs_added", 0) == t["docs_kept"] + t["docs_dropped"]
    kept = list(iter_documents(out))
    assert len(kept) == t["docs_written"] == t["docs_kept"] + t["copies_added"]  # mixing may repeat documents
    dropped = [d for f in sorted((out / "dropped").glob("*.jsonl.zst")) for d in iter_documents(f)]
    assert len(dropped) == t["docs_dropped"]
    assert Counter(d["meta"]["drop_reason"] for d in dropped) == Counter(stats["dropped_by_reason"])
    assert sum(t for t in stats["dropped_by_reason"].values()) == t["docs_dropped"]
    return stats


def small_inputs(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    hamlet = (DEMO / "books" / "shakespeare-hamlet.txt").read_text()
    # the two biggest files, so the first two shards get one each (a.txt, with Windows line ends, is bigger)
    (src / "a.txt").write_bytes(hamlet.replace("\n", "\r\n").encode())
    (src / "b.txt").write_text(hamlet)  # an exact copy up to line ends
    for name in ("shakespeare-macbeth.txt", "kjv-ruth.txt", "kjv-jonah.txt"):
        (src / name).write_bytes((DEMO / "books" / name).read_bytes())
    (src / "copy.html").write_bytes((DEMO / "html" / "library" / "copy.html").read_bytes())
    return src


def test_exact_dedup_across_shards(tmp_path):
    src = small_inputs(tmp_path)
    out = tmp_path / "out"
    m = run(Config(inputs=[str(src)], shards=2), out)
    stats = check_conservation(out)
    plan = executor.plan_shards(collect_inputs([str(src)])[0], 2)
    shard_of = {f.name: i for i, fs in enumerate(plan) for f in fs}
    assert shard_of["a.txt"] != shard_of["b.txt"]
    kept_a = [d["id"] for d in iter_documents(out) if d["meta"]["source"].endswith("a.txt")]
    assert len(kept_a) > 3
    assert not [d for d in iter_documents(out) if d["meta"]["source"].endswith("b.txt")]
    dups = list(iter_documents(out / "dropped" / f"dedup-part-{shard_of['b.txt']:05d}.jsonl.zst"))
    assert len(dups) == len(kept_a) == m.metrics["dropped_by_reason"]["exact_duplicate"]
    assert all(d["meta"]["source"].endswith("b.txt") for d in dups)
    assert sorted(d["meta"]["duplicate_of"] for d in dups) == sorted(kept_a)
    assert stats["steps"][-1]["name"] == "exact_dedup_v1"


def test_resume_skips_finished_shards_and_fingerprint_skips_run(tmp_path, monkeypatch, capsys):
    src = small_inputs(tmp_path)
    cfg = Config(inputs=[str(src)], shards=3)
    reference = run(cfg, tmp_path / "ref")

    out = tmp_path / "out"
    real_run_shard = executor.run_shard

    def crash_on_shard_1(task, on_file=None):
        if task.index == 1:
            raise RuntimeError("simulated crash")
        return real_run_shard(task, on_file)

    monkeypatch.setattr(executor, "run_shard", crash_on_shard_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, out)
    assert read_manifest(out).status == "failed"
    assert (out / ".done" / "part-00000").is_file() and not (out / ".done" / "part-00001").exists()
    shard0 = out / "dropped" / "part-00000.jsonl.zst"
    mtime = shard0.stat().st_mtime_ns

    monkeypatch.setattr(executor, "run_shard", real_run_shard)
    m = run(cfg, out)
    assert m.status == "done" and m.metrics["shards_resumed"] == 1
    assert shard0.stat().st_mtime_ns == mtime  # not rewritten
    assert "already done" in capsys.readouterr().err
    assert [d["id"] for d in iter_documents(out)] == [d["id"] for d in iter_documents(tmp_path / "ref")]
    assert m.metrics["docs_kept"] == reference.metrics["docs_kept"]
    check_conservation(out)

    again = run(cfg, out)  # same config, same inputs: skipped by fingerprint
    assert again.run_id == m.run_id
    assert "up to date" in capsys.readouterr().err
    changed = run(cfg.model_copy(update={"min_words": 5000}), out)  # a new config re-runs from scratch
    assert changed.run_id != m.run_id and changed.metrics["shards_resumed"] == 0
    assert changed.metrics["dropped_by_reason"].get("too_few_words", 0) > 0


def test_iter_documents_inputs(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "hello", "lang": "en"}) + "\n")
        f.write("{broken\n")
        f.write(json.dumps({"id": 7, "text": "world", "meta": {"a": 1}}) + "\n")
    errors = []
    docs = list(iter_documents(path, on_error=lambda r, line, d: errors.append((r, line))))
    assert [d["text"] for d in docs] == ["hello", "world"]
    assert docs[0]["meta"] == {"lang": "en"} and docs[1] == {"id": "7", "text": "world", "meta": {"a": 1}}
    assert errors == [("read_error:malformed_json", 2)]
    assert list(iter_texts(tmp_path)) == ["hello", "world"]
    unfinished = tmp_path / "art"
    unfinished.mkdir()
    write_json(unfinished / "manifest.json", {
        "stage": "data", "stage_version": "1", "fingerprint": "x", "run_id": "r", "status": "running",
        "config": {}, "started_at": 0.0})
    with pytest.raises(ValueError, match="unfinished"):
        list(iter_documents(unfinished))


def test_shard_writer_is_atomic(tmp_path):
    target = tmp_path / "s.jsonl.zst"
    with pytest.raises(ZeroDivisionError):
        with ShardWriter(target) as w:
            w.write(Document("a", "text", {}))
            1 / 0
    assert not target.exists() and not list(tmp_path.iterdir())
    with ShardWriter(target) as w:
        w.write(Document("a", "text", {"k": "é"}))
    assert [r for _, r in iter_jsonl(target, lambda *a: None)] == [{"id": "a", "text": "text", "meta": {"k": "é"}}]


# ----------------------------------------------------------------------------------------------------------------------
# the whole demo corpus


def test_full_demo_corpus(tmp_path):
    out = tmp_path / "data"
    m = run(Config(inputs=[str(DEMO)], shards=3), out)
    assert m.status == "done" and m.stage == "data"
    assert set(m.inputs) == {"raw0"}
    stats = check_conservation(out)
    mt = m.metrics
    assert mt["docs_in"] > 300 and mt["docs_kept"] > 200
    assert set(mt["read_errors_by_reason"]) >= {
        "read_error:empty_file", "read_error:malformed_json", "read_error:truncated_gzip"}
    assert mt["dropped_by_reason"]["exact_duplicate"] >= 2  # the mirror pages, the copies in broken/
    assert mt["dropped_by_reason"]["too_few_words"] >= 3  # index / search pages
    kept = list(iter_documents(out))
    ids = [d["id"] for d in kept]
    assert len(ids) == len(set(ids))
    sources = Counter(Path(d["meta"]["source"]).relative_to(DEMO).parts[0] for d in kept)
    assert sources["books"] > 100 and sources["html"] > 20 and sources["warc"] > 20 and sources["jsonl"] > 25
    assert not any("genindex" in d["meta"]["source"] for d in kept)
    assert any(d["meta"].get("url", "").startswith("https://docs.djangoproject.com/") for d in kept)
    assert all(d["text"].strip() and "<html" not in d["text"][:200] for d in kept)
    report = (out / "report.html").read_text()
    assert "gopher_quality_v2" in report and "read_error:malformed_json" in report and "exact_duplicate" in report
    assert stats["timing"]["docs_per_s"] > 0


def test_workers_give_same_result(tmp_path):
    src = small_inputs(tmp_path)
    a = run(Config(inputs=[str(src)], shards=3, workers=1), tmp_path / "a")
    b = run(Config(inputs=[str(src)], shards=3, workers=2), tmp_path / "b")
    assert a.metrics["dropped_by_reason"] == b.metrics["dropped_by_reason"]
    assert [d["id"] for d in iter_documents(tmp_path / "a")] == [d["id"] for d in iter_documents(tmp_path / "b")]
