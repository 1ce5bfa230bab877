"""RAG: ingest, chunking, index (faiss + BM25 + RRF, filters, persistence, incremental, atomic swap), evaluation,
grounded answers with citations, and the HTTP router."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.rag.answer import (NOT_FOUND, SUPPORT_THRESHOLD, Answerer, Attributor, CitationStreamFilter, Source,
                                attribute_citations, clean_citations, split_sentences, support_score)
from lmforge.rag.chunking import Chunker
from lmforge.rag.evaluate import exact_match, f1_score, faithfulness, load_qa, retrieval_metrics
from lmforge.rag.index import Filters, KnowledgeBase, bm25_tokens
from lmforge.rag.ingest import SourceDoc, ingest_folder
from lmforge.rag.stage import Config, build_index

REPO = Path(__file__).resolve().parents[1]
KB_DOCS = REPO / "data" / "kb" / "docs"
QA = REPO / "data" / "kb" / "qa.jsonl"

# a short Chinese text written for this test (sentence ends 。！？ with no spaces)
ZH = "# 会话\n\nDjango 默认把会话数据保存在数据库中。也可以使用缓存保存会话！文件会话需要设置 SESSION_FILE_PATH 吗？可以设置。\n"


def _pdf_bytes(lines: list[str]) -> bytes:
    """A minimal one-page PDF with a text layer (Helvetica), built by hand."""
    ops = "BT /F1 11 Tf 50 780 Td 14 TL " + " ".join(
        "(" + ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*" for ln in lines) + " ET"
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
            "/Contents 4 0 R >>", f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _topic(name: str) -> str:
    from pydoc_data.topics import topics

    return topics[name]


class MemoEmbedder:
    """Real MiniLM, but each distinct text is embedded once per test session (the tests re-index the same files)."""

    def __init__(self) -> None:
        from lmforge.rag.embed import make_embedder

        self.inner = make_embedder("minilm")
        self.name = self.inner.name
        self.batch_size = 64
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.inner.embed(todo)))
        return np.stack([self.memo[t] for t in texts]) if texts else self.inner.embed([])


_MEMO: list[MemoEmbedder] = []


def memo_embedder() -> MemoEmbedder:
    if not _MEMO:
        _MEMO.append(MemoEmbedder())
    return _MEMO[0]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """MiniLM on one thread: on a shared, busy CPU two spinning OpenMP threads make a one-query embedding ~20x
    slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    """Mixed folder: real Django FAQ HTML, pydoc topics as .md / .txt / .jsonl / .pdf, Chinese text, bad files."""
    root = tmp_path_factory.mktemp("kbdocs")
    (root / "django").mkdir()
    for name in ("general", "models", "admin"):
        shutil.copy(KB_DOCS / "django" / "faq" / f"{name}.html", root / "django" / f"{name}.html")
    (root / "python").mkdir()
    (root / "python" / "assert.md").write_text("# The assert statement\n\n## Semantics\n\n" + _topic("assert"))
    (root / "python" / "pass.txt").write_text(_topic("pass"))
    lines = [json.dumps({"title": "while", "text": _topic("while")}), "{broken json",
             json.dumps({"title": "for", "text": _topic("for")})]
    (root / "python" / "topics.jsonl").write_text("\n".join(lines) + "\n")
    (root / "python" / "break.pdf").write_bytes(_pdf_bytes([s for s in _topic("break").splitlines() if s.strip()][:20]))
    (root / "zh.md").write_text(ZH)
    (root / "bad").mkdir()
    (root / "bad" / "blob.txt").write_bytes(b"\x00\x01\x02 binary")
    shutil.copy(REPO / "data" / "demo" / "broken" / "sonnets-cp1252.txt", root / "bad" / "cp1252.txt")
    (root / "bad" / "empty.md").write_text("")
    (root / "bad" / "notes.docx").write_bytes(b"PK\x03\x04")
    (root / "bad" / "scan.pdf").write_bytes(b"%PDF-1.4 this is not a real pdf")
    return root


@pytest.fixture(scope="module")
def kb_dir(docs_dir, tmp_path_factory) -> tuple[Path, KnowledgeBase, dict]:
    out = tmp_path_factory.mktemp("kbindex") / "rag"
    kb, report = build_index(Config(docs=str(docs_dir), chunk_tokens=120, overlap_tokens=20), out,
                             embedder=memo_embedder())
    return out, kb, report


# -- ingest + chunking ---------------------------------------------------------------------------------------------------
def test_ingest_reads_every_format_and_skips_bad_files_with_reasons(docs_dir):
    records = {r.path: r for r in ingest_folder(docs_dir)}
    skipped = {p: r.skipped for p, r in records.items() if r.skipped}
    assert skipped == {"bad/blob.txt": "binary", "bad/empty.md": "empty",
                       "bad/notes.docx": "unsupported_type", "bad/scan.pdf": "pdf_error"}
    assert records["bad/cp1252.txt"].docs[0].encoding == "cp1252"  # detected, not skipped
    assert "beauty\u2019s rose" in records["bad/cp1252.txt"].docs[0].text
    html = records["django/general.html"].docs[0]
    assert "Django is named after Django Reinhardt" in html.text and "<div" not in html.text
    assert html.headings["What does “Django” mean, and how do you pronounce it?"] > 1
    jsonl = records["python/topics.jsonl"]
    assert [d.path for d in jsonl.docs] == ["python/topics.jsonl#1", "python/topics.jsonl#3"]
    assert jsonl.warnings and "topics.jsonl:2" in jsonl.warnings[0]
    pdf = records["python/break.pdf"].docs[0]
    assert "break" in pdf.text and "loop" in pdf.text
    assert records["python/assert.md"].docs[0].title == "The assert statement"


def test_chunks_keep_exact_offsets_heading_paths_and_size(docs_dir):
    chunker = Chunker(target_tokens=60, overlap_tokens=15)
    records = {r.path: r for r in ingest_folder(docs_dir)}
    for rec in records.values():
        for doc in rec.docs:
            for c in chunker.chunk(doc):
                assert doc.text[c.start:c.end] == c.text
                assert c.n_tokens <= 60
    chunks = chunker.chunk(records["django/general.html"].docs[0])
    pron = [c for c in chunks if "JANG-oh" in c.text]
    assert pron and pron[0].heading_path == ["FAQ: General", "What does “Django” mean, and how do you pronounce it?"]
    md = chunker.chunk(records["python/assert.md"].docs[0])
    assert md[0].heading_path == ["The assert statement", "Semantics"] and len(md) > 1
    # consecutive chunks of one section overlap (the next starts before the previous ends)
    assert any(b.start < a.end for a, b in zip(md, md[1:]))


def test_cjk_sentences_and_bm25_tokens():
    doc = SourceDoc("zh.md", "md", ZH)
    chunks = Chunker(target_tokens=24, overlap_tokens=0).chunk(doc)
    assert chunks[0].text == "# 会话\n\nDjango 默认把会话数据保存在数据库中。"  # the next sentence would not fit
    assert len(chunks) > 2 and all(c.text[-1] in "。！？" for c in chunks)  # cut only at CJK sentence ends
    assert all(c.heading_path == ["会话"] for c in chunks)
    toks = bm25_tokens("数据库中 the Sessions")
    assert "数据" in toks and "据库" in toks and "库" in toks and "sessions" in toks and "the" not in toks


# -- index ---------------------------------------------------------------------------------------------------------------
def test_index_report_search_filters_and_reload(kb_dir):
    out, kb, report = kb_dir
    assert {s["path"] for s in report["skipped"]} == {"bad/blob.txt", "bad/empty.md",
                                                      "bad/notes.docx", "bad/scan.pdf"}
    assert report["not_utf8_files"] == {"bad/cp1252.txt": "cp1252"} and report["encodings"]["cp1252"] == 1
    assert report["dense_index"] == "flat" and report["chunks"] == len(kb) > 10
    assert json.loads((out / "report.json").read_text())["chunks"] == len(kb)
    for mode in ("hybrid", "dense", "bm25"):
        top = kb.search("How do you pronounce Django?", k=3, mode=mode)
        assert any("JANG-oh" in h.chunk.text for h in top), mode
    zh = kb.search("会话数据保存在哪里", k=2, mode="bm25")
    assert zh and zh[0].chunk.path == "zh.md"
    only_py = kb.search("How do you pronounce Django?", k=5, filters=Filters(path_prefix="python/"))
    assert only_py and all(h.chunk.path.startswith("python/") for h in only_py)
    only_pdf = kb.search("loop", k=5, filters=Filters(types=["pdf"]))
    assert only_pdf and {h.chunk.type for h in only_pdf} == {"pdf"}
    assert kb.search("loop", filters=Filters(path_prefix="nowhere/")) == []

    again = KnowledgeBase.load(out)
    q = "Can a model have a primary key over several columns?"
    assert [h.chunk.chunk_id for h in again.search(q, k=5)] == [h.chunk.chunk_id for h in kb.search(q, k=5)]


def test_incremental_reindex_and_atomic_swap(docs_dir, tmp_path):
    src = tmp_path / "docs"
    shutil.copytree(docs_dir, src)
    out = tmp_path / "rag"
    cfg = Config(docs=str(src), chunk_tokens=120, overlap_tokens=20)
    emb = memo_embedder()
    kb1, rep1 = build_index(cfg, out, embedder=emb)
    # change one file, delete one, add one
    (src / "python" / "pass.txt").write_text(_topic("pass") + "\n\nAn extra paragraph about the pass statement.\n")
    (src / "django" / "admin.html").unlink()
    (src / "python" / "del.md").write_text("# del\n\n" + _topic("del"))
    kb2, rep2 = build_index(cfg, out, embedder=emb)
    assert rep2["changed"] == ["python/pass.txt"] and rep2["added"] == ["python/del.md"]
    assert rep2["deleted"] == ["django/admin.html"]
    new_chunks = [c for c in kb2.chunks if c.path in ("python/pass.txt", "python/del.md")]
    assert rep2["chunks_embedded"] == len(new_chunks) < rep1["chunks_embedded"]
    assert not any(c.path == "django/admin.html" for c in kb2.chunks)
    # reused vectors are the same as freshly computed ones
    i = next(i for i, c in enumerate(kb2.chunks) if c.path == "django/general.html")
    j = next(j for j, c in enumerate(kb1.chunks) if c.chunk_id == kb2.chunks[i].chunk_id)
    assert np.allclose(kb2.vectors[i], kb1.vectors[j])

    class Crash:
        name = kb2.embedder_name

        def embed(self, texts):
            raise RuntimeError("power cut")

    (src / "python" / "del.md").write_text("# del\n\nchanged again\n")
    live = KnowledgeBase.live_version(out)
    with pytest.raises(RuntimeError, match="power cut"):
        build_index(cfg, out, embedder=Crash())
    assert KnowledgeBase.live_version(out) == live  # the previous version stays live and whole
    assert len(KnowledgeBase.load(out)) == len(kb2)


def test_stage_run_writes_manifest_and_skips_when_unchanged(docs_dir, tmp_path, monkeypatch):
    from lmforge.artifacts import read_manifest
    from lmforge.rag import stage
    from lmforge.rag.stage import run

    monkeypatch.setattr(stage, "config_embedder", lambda config: memo_embedder())
    sub = tmp_path / "docs"
    sub.mkdir()
    shutil.copy(docs_dir / "django" / "models.html", sub / "models.html")
    m = run(Config(docs=str(sub)), tmp_path / "out")
    assert m.status == "done" and m.metrics["chunks"] > 0 and m.metrics["skipped"] == 0
    assert run(Config(docs=str(sub)), tmp_path / "out").run_id == m.run_id
    assert read_manifest(tmp_path / "out").stage == "rag_index"


# -- evaluation ----------------------------------------------------------------------------------------------------------
def test_retrieval_metrics_on_bundled_qa(kb_dir):
    _, kb, _ = kb_dir
    items = [q for q in load_qa(QA) if q.gold and q.gold[0]["path"] in
             ("django/faq/general.html", "django/faq/models.html", "django/faq/admin.html")]
    for q in items:  # the test index holds these pages under django/
        q.gold = [{"path": g["path"].replace("django/faq/", "django/"), "quote": g["quote"]} for g in q.gold]
    assert len(items) >= 10
    m = retrieval_metrics(kb, items, mode="hybrid", ks=(1, 5))
    assert m["gold_not_found_in_index"] == 0
    assert m["recall@5"] >= 0.7 and 0 < m["mrr"] <= 1 and 0 < m["ndcg@5"] <= 1
    assert retrieval_metrics(kb, items, mode="bm25", ks=(5,))["recall@5"] > 0.5


def test_load_qa_names_file_and_line(tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "ok?", "answers": [], "gold": []}\n{"answers": []}\n')
    with pytest.raises(ValueError, match=r"qa.jsonl:2"):
        load_qa(bad)
    assert len(load_qa(QA)) >= 40


def test_answer_metrics_functions():
    assert exact_match("The 3-clause BSD license.", ["3-clause BSD license"]) == 1.0
    assert f1_score("it is JANG-oh", ["JANG-oh"]) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    src = {1: "Django is pronounced JANG-oh. Rhymes with FANG-oh."}
    fa = faithfulness("Django is pronounced JANG-oh [1]. It was written on the moon [1]. No citation here.", src)
    assert fa["cited_sentences"] == 2 and fa["supported_sentences"] == 1 and fa["faithfulness"] == 0.5


# -- answering -----------------------------------------------------------------------------------------------------------
class Scripted:
    """A generator that replies with fixed text, split into small deltas (like a streaming model)."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.calls: list[list[dict]] = []

    def stream(self, messages, max_tokens):
        self.calls.append(messages)
        text = self.replies.pop(0)
        for i in range(0, len(text), 3):
            yield text[i:i + 3]


def test_citations_are_mapped_and_unretrieved_ones_dropped(kb_dir):
    _, kb, _ = kb_dir
    gen = Scripted("Django is pronounced JANG-oh [1]. It is named after a guitarist [2][9]. See also [1, 7].")
    ans = Answerer(kb, gen, k=3, system_prompt="You are Ada, the friendly support bot of ACME.")
    res = ans.ask("How do you pronounce Django?")
    assert not res.refused and len(res.sources) == 3
    assert "[9]" not in res.answer and "[7]" not in res.answer and "[1, 7]" not in res.answer
    assert res.answer.startswith("Django is pronounced JANG-oh [1]. It is named after a guitarist [")
    c1 = res.citations[0]
    assert c1.number == 1 and c1.method == "model" and kb.doc_text(c1.path)[c1.start:c1.end] == c1.text
    # every citation left stands on a source that supports its sentence (issue 15); "See also" supports nothing
    by_number = {s.number: s for s in res.sources}
    for sent in split_sentences(res.answer):
        for n in [int(x) for m in re.finditer(r"\[(\d+(?:, \d+)*)\]", sent) for x in m.group(1).split(", ")]:
            assert support_score(sent, by_number[n].text) >= SUPPORT_THRESHOLD, (sent, n)
    assert res.answer.endswith("See also [unsupported].")
    system, user = gen.calls[0]
    assert system["role"] == "system" and system["content"].startswith("You are Ada") and "[1]" in system["content"]
    assert "[1] django/" in system["content"] and res.sources[0].text in system["content"]
    assert user == {"role": "user", "content": "How do you pronounce Django?"}


def test_uncited_sentences_get_attributed_to_retrieved_sources_only(kb_dir):
    _, kb, _ = kb_dir
    q = "How do you pronounce Django?"
    # the second sentence is true and in the index, but not in the one retrieved chunk: it must stay uncited
    reply = ("Django is pronounced JANG-oh, it rhymes with FANG-oh. Django is distributed under the 3-clause BSD "
             "license. The moon is made of cheese. Yes.")
    events = list(Answerer(kb, Scripted(reply), k=1).stream(q))
    res = events[-1].final
    assert "".join(e.delta for e in events[:-1]) == res.answer  # streamed text == final text, markers included
    assert res.answer == ("Django is pronounced JANG-oh, it rhymes with FANG-oh [1]. Django is distributed under the "
                          "3-clause BSD license [unsupported]. The moon is made of cheese [unsupported]. Yes.")
    assert res.unsupported == ["Django is distributed under the 3-clause BSD license.", "The moon is made of cheese."]
    assert [(c.number, c.method) for c in res.citations] == [(1, "attributed")]
    assert "JANG-oh" in res.citations[0].to_dict()["text"] and res.citations[0].to_dict()["method"] == "attributed"

    # a model citation stays only where its source supports the sentence; the uncited sentence is attributed
    reply = "Django is named after Django Reinhardt, a guitarist [2]. It is pronounced JANG-oh."
    res = Answerer(kb, Scripted(reply), k=3).ask(q)
    jang = next(s.number for s in res.sources if "JANG-oh" in s.text)
    reinhardt = next(s.number for s in res.sources if "Reinhardt" in s.text)
    assert res.answer.endswith(f"It is pronounced JANG-oh [{jang}].")
    assert res.answer.startswith(f"Django is named after Django Reinhardt, a guitarist [{reinhardt}].")
    assert {c.number: c.method for c in res.citations}[reinhardt] == ("model" if reinhardt == 2 else "attributed")
    assert {c.number for c in res.citations} <= {s.number for s in res.sources}

    # attribution off: the model's text is left alone
    res = Answerer(kb, Scripted("It is pronounced JANG-oh."), k=3, attribute=False).ask(q)
    assert res.answer == "It is pronounced JANG-oh." and res.citations == []
    # a refusal in the model's words is never given a citation
    res = Answerer(kb, Scripted(NOT_FOUND), k=3).ask(q)
    assert res.refused and res.citations == []


def test_attributor_sentence_boundaries():
    srcs = [Source(1, "a.md", "a", [], 0, 40, "Sessions are stored in the database by default since 3.5.", 0.5),
            Source(2, "b.md", "b", [], 0, 40, "会话数据默认保存在数据库中。", 0.4)]
    att = Attributor(srcs)
    pieces = [att.feed(d) for d in ["Sessions are ", "stored in the database.", " [1]\n", "Stored by default", ".\n",
                                    "会话数据保存在数据库中。", "Cookies are fun."]]
    assert pieces[1] == ""  # the sentence is held until it is clear no citation follows
    text = "".join(pieces) + att.flush()
    assert text == ("Sessions are stored in the database. [1]\nStored by default [1].\n会话数据保存在数据库中 [2]。"
                    "Cookies are fun [unsupported].")
    assert att.model_cited == {1} and att.attributed == {1, 2}
    assert attribute_citations("Sessions are stored in database 3.5.", srcs)[0] == (
        "Sessions are stored in database 3.5 [1].")  # "3.5" is no sentence end


def test_refuses_without_calling_the_model_when_nothing_relevant(kb_dir):
    _, kb, _ = kb_dir
    gen = Scripted("should not be used")
    res = Answerer(kb, gen, min_score=0.45).ask("What is the boiling point of liquid nitrogen?")
    assert res.refused and res.answer == NOT_FOUND and res.sources == [] and res.citations == []
    assert gen.calls == []


def test_streaming_filter_and_follow_up_rewrite(kb_dir):
    filt = CitationStreamFilter({1, 2})
    pieces = [filt.feed(d) for d in ["Yes [", "1", "] and [", "3] or [2", "]. Arrays [i] stay."]] + [filt.flush()]
    assert "".join(pieces) == "Yes [1] and  or [2]. Arrays [i] stay."
    assert clean_citations("a [5] b [2].", {1, 2}) == ("a  b [2].", [2])

    _, kb, _ = kb_dir
    gen = Scripted("Can Django models have a primary key made of several columns?", "No, only single-column [1].")
    ans = Answerer(kb, gen, k=3)
    history = [{"role": "user", "content": "Tell me about Django models."},
               {"role": "assistant", "content": "They map classes to tables."}]
    events = list(ans.stream("And multi-column primary keys?", history))
    final = events[-1].final
    assert final.standalone_question == "Can Django models have a primary key made of several columns?"
    assert "".join(e.delta for e in events[:-1]) == final.answer == "No, only single-column [1]."
    assert any("single-column primary keys" in s.text for s in final.sources)


def test_engine_generator_plumbing_with_a_tiny_model(kb_dir, tmp_path):
    from lmforge.rag.answer import EngineGenerator
    from lmforge.serve.engine import Engine
    from tests.test_serve import _build_serve_model

    _build_serve_model(tmp_path / "tiny")
    engine = Engine.from_folder(tmp_path / "tiny", max_num_seqs=1, max_model_len=None)
    try:
        _, kb, _ = kb_dir
        res = Answerer(kb, EngineGenerator(engine), k=2, max_tokens=8).ask("How do you pronounce Django?")
        assert not res.refused and len(res.sources) == 2
        assert {c.number for c in res.citations} <= {1, 2}
    finally:
        engine.shutdown()


# -- HTTP ----------------------------------------------------------------------------------------------------------------
def test_http_router(kb_dir):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lmforge.rag.http import rag_router

    _, kb, _ = kb_dir
    app = FastAPI()
    app.include_router(rag_router(Answerer(kb, Scripted("It is JANG-oh [1] [4].", "Pronounced JANG-oh [2]."), k=3)))
    client = TestClient(app)
    body = client.post("/v1/rag/query", json={"question": "How do you pronounce Django?"}).json()
    assert body["answer"] == "It is JANG-oh [1]." and [c["number"] for c in body["citations"]] == [1]
    assert body["citations"][0]["path"].startswith("django/") and "start" in body["citations"][0]
    with client.stream("POST", "/v1/rag/query", json={"question": "How do you pronounce Django?", "stream": True,
                                                      "path_prefix": "django/"}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][6:])["final"]
    jang = next(s["number"] for s in final["sources"] if "JANG-oh" in s["text"])  # the model's [2] is checked
    assert final["answer"] == f"Pronounced JANG-oh [{jang}]." and all(s["path"].startswith("django/")
                                                                      for s in final["sources"])
    assert client.post("/v1/rag/query", json={"question": ""}).status_code == 422
