"""RAG input hygiene: binary files named as text are skipped, legacy encodings are read and said, heading-only
sections never become chunks of their own, and answers cite only what their sources support."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.rag.chunking import Chunker
from lmforge.rag.ingest import ingest_folder
from lmforge.rag.stage import Config, build_index

PARA = "The ship sailed at dawn and the crew watched the coast fade behind them while gulls followed the wake. " * 3
BOOK_HTML = ("<html><head><title>The Voyage</title></head><body><h1>The&nbsp;Voyage</h1>"
             "<h2>CHAPTER&nbsp;I.</h2><h3>Departure</h3><p>" + PARA + "</p>"
             "<h2>CHAPTER&nbsp;II.</h2><p>" + PARA.replace("ship", "boat") + "</p><h2>CHAPTER&nbsp;III.</h2>"
             "</body></html>")
BOOK_MD = ("# The\u00a0Voyage\n\n## Chapter\u00a0I\n\n### Departure\n\nThe ship sailed at dawn.\n\n"
           "## Chapter\u00a0II\n\nThe crew slept on deck until the storm came.\n")


@pytest.fixture(scope="module")
def kb_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kbhyg")
    (root / "book.html").write_text(BOOK_HTML)
    (root / "book.md").write_text(BOOK_MD)
    rng = random.Random(0)
    (root / "random.html").write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    (root / "random.txt").write_bytes(bytes(rng.randrange(1, 256) for _ in range(400)))  # no NUL byte
    (root / "photo.md").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"text-like bytes " * 20)
    (root / "notes.txt").write_bytes("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u201cquoted\u201d notes about the "
                                     "voyage and the crew.\n".encode("cp1252") * 4)
    return root


def test_binary_files_with_text_names_are_skipped_and_encodings_reported(kb_folder, tmp_path):
    records = {r.path: r for r in ingest_folder(kb_folder)}
    assert {p: r.skipped for p, r in records.items() if r.skipped} == {
        "random.html": "binary", "random.txt": "binary", "photo.md": "binary"}
    assert "JPEG" in records["photo.md"].detail
    assert records["notes.txt"].docs[0].encoding == "cp1252" and "naïve résumé" in records["notes.txt"].docs[0].text
    assert records["book.html"].docs[0].encoding == "utf-8"

    from lmforge.rag.embed import make_embedder
    from lmforge.rag.index import KnowledgeBase

    kb, report = build_index(Config(docs=str(kb_folder), chunk_tokens=60, overlap_tokens=10), tmp_path / "kb",
                             embedder=make_embedder("minilm"))
    assert {s["path"] for s in report["skipped"]} == {"random.html", "random.txt", "photo.md"}
    assert report["not_utf8_files"] == {"notes.txt": "cp1252"}
    assert all(not c.path.startswith(("random", "photo")) for c in kb.chunks)
    reloaded = KnowledgeBase.load(tmp_path / "kb", with_embedder=False)
    assert {d.path: d.encoding for d in reloaded.docs}["notes.txt"] == "cp1252"

    # no chunk is a bare heading, however the query matches its words
    for mode in ("hybrid", "bm25", "dense"):
        for q in ("CHAPTER III", "Chapter I", "The Voyage"):
            top = kb.search(q, k=1, mode=mode)[0]
            assert len(top.chunk.text.split("\n")) > 1 or len(top.chunk.text.split()) > 6, (mode, q, top.chunk.text)


def test_heading_only_sections_join_the_next_section(kb_folder):
    chunker = Chunker(target_tokens=60, overlap_tokens=10)
    for rec in ingest_folder(kb_folder):
        for doc in rec.docs:
            chunks = chunker.chunk(doc)
            for c in chunks:
                assert doc.text[c.start:c.end] == c.text
                lines = [ln for ln in c.text.splitlines() if ln.strip()]
                body = [ln for ln in lines if " ".join(ln.strip("# ").split()) not in
                        {*doc.headings, *c.heading_path}]
                assert body, f"heading-only chunk {c.text!r} in {doc.path}"
            if doc.path == "book.html":
                first = chunks[0]
                assert first.text.startswith("The\u00a0Voyage") and "Departure" in first.text
                assert first.heading_path == ["The Voyage", "CHAPTER I.", "Departure"]
                assert not any("CHAPTER\u00a0III" in c.text for c in chunks)  # a last title with nothing under it
            if doc.path == "book.md":
                assert chunks[0].heading_path == ["The Voyage", "Chapter I", "Departure"]
                assert chunks[0].text.startswith("# The\u00a0Voyage")


# -- answers: citations only where the source supports the sentence -------------------------------------------------------
class Scripted:
    def __init__(self, reply: str) -> None:
        self.reply = reply

    def stream(self, messages, max_tokens):
        for i in range(0, len(self.reply), 4):
            yield self.reply[i:i + 4]


@pytest.fixture(scope="module")
def small_kb(kb_folder, tmp_path_factory):
    from lmforge.rag.embed import make_embedder

    kb, _ = build_index(Config(docs=str(kb_folder), chunk_tokens=60, overlap_tokens=10),
                        tmp_path_factory.mktemp("smallkb") / "kb", embedder=make_embedder("minilm"))
    return kb


def test_wrong_answer_gets_no_citation_and_an_ungrounded_one_is_withheld(small_kb):
    from lmforge.rag.answer import NOT_FOUND, UNSUPPORTED, Answerer

    q = "When did the ship sail?"
    # a small model's wrong answer, with a citation it made up: the citation is removed, the sentence marked
    reply = "The ship sailed at dawn [1]. The captain was Horatio Nelson, a famous admiral [1]."
    res = Answerer(small_kb, Scripted(reply), k=2, min_score=0.0).ask(q)
    first, second = res.answer.split(". ", 1)
    assert first.startswith("The ship sailed at dawn [") and "[unsupported]" not in first
    assert second == f"The captain was Horatio Nelson, a famous admiral {UNSUPPORTED}."
    assert res.unsupported == ["The captain was Horatio Nelson, a famous admiral."] and not res.refused

    # nothing the model wrote is in the sources: the reply says so instead of showing the unsupported text
    wrong = "The voyage ended in Lisbon in 1492 with a cargo of pepper. The cook was Portuguese."
    events = list(Answerer(small_kb, Scripted(wrong), k=2, min_score=0.0).stream(q))
    final = events[-1].final
    assert "".join(e.delta for e in events[:-1]) == final.answer == NOT_FOUND
    assert final.refused and final.citations == [] and final.ungrounded_text.replace(f" {UNSUPPORTED}", "") == wrong
    assert final.to_dict()["unsupported"] == ["The voyage ended in Lisbon in 1492 with a cargo of pepper.",
                                              "The cook was Portuguese."]
    # attribution off: the text is passed through, as before
    res = Answerer(small_kb, Scripted(wrong), k=2, min_score=0.0, attribute=False).ask(q)
    assert res.answer == wrong and not res.refused


def test_jsonl_lines_that_are_not_utf8_cost_only_themselves(tmp_path):
    good = '{"title": "ok", "text": "Caf\\u00e9 notes about the voyage and the crew."}'
    (tmp_path / "kb.jsonl").write_bytes(good.encode() + b"\n" + b'{"text": "CESU \xed\xa0\x80 bytes"}\n'
                                        + b'{"text": "an escape \\ud800 here"}\n' + b'{"text": "Latin-1 \xe9t\xe9"}\n'
                                        + "{\"text\": \"Grüße aus München\"}\n".encode())
    (rec,) = ingest_folder(tmp_path)
    assert [d.path for d in rec.docs] == ["kb.jsonl#1", "kb.jsonl#5"] and rec.docs[1].text == "Grüße aus München"
    assert [w.split(": ")[0] for w in rec.warnings] == ["kb.jsonl:2", "kb.jsonl:3", "kb.jsonl:4"]
