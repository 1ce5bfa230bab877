"""HTML extraction: the per-page time limit and the trafilatura extractor, on the demo's real pages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lmforge.data.documents import Document
from lmforge.data.readers import ReadLog, read_file
from lmforge.data.stage import Config, run
from lmforge.data.steps import HtmlExtract

from test_data import DEMO, check_conservation, pipeline

SLOW_MARK = "copy — Shallow and deep copy operations"  # in the title of library/copy.html


def demo_pages(n: int | None = None) -> list[Document]:
    log = ReadLog()
    files = sorted((DEMO / "html").rglob("*.html"))
    docs = [d for f in files for d in read_file(f, log)]
    return docs[:n] if n else docs


def slow_on_copy_page(original):
    def extract(self, html: str):
        if SLOW_MARK in html:
            time.sleep(60)  # a page that "hangs" the extractor
        return original(self, html)
    return extract


def test_timeout_drops_slow_page_and_keeps_the_rest(monkeypatch):
    monkeypatch.setattr(HtmlExtract, "extract", slow_on_copy_page(HtmlExtract.extract))
    by_file = {Path(d.id).relative_to(DEMO / "html").as_posix(): d for d in demo_pages()}
    docs = [by_file["about.html"], by_file["bugs.html"], by_file["library/copy.html"], by_file["download.html"]]
    step = HtmlExtract(timeout=1.0)
    out = pipeline(docs, step)
    assert [d.meta.get("drop_reason") for d in out] == [None, None, "extract_timeout", None]
    assert out[2].meta["extract_timeout_s"] == 1.0
    assert not out[3].dropped and out[3].meta["extractor"] == "resiliparse"  # the helper was restarted
    assert step.stats.dropped == {"extract_timeout": 1} and step.stats.kept == 3
    assert step._sandbox is None  # closed once the stream ended


def test_extractor_error_is_a_drop_reason(monkeypatch):
    def broken(self, html):
        raise ValueError("bad markup")

    monkeypatch.setattr(HtmlExtract, "extract", broken)
    for timeout in (0.0, 5.0):
        out = pipeline(demo_pages(2), HtmlExtract(timeout=timeout))
        assert [d.meta["drop_reason"] for d in out] == ["extract_error", "extract_error"]
        assert out[0].meta["extract_error"] == "ValueError: bad markup"
    plain = Document("t", "plain text passes", {"format": "text"})
    assert pipeline([plain], HtmlExtract(timeout=5.0))[0].text == "plain text passes"


def test_stage_timeout_with_worker_processes(tmp_path):
    """The helper process also starts inside the executor's worker processes; the result equals a run without it."""
    base = dict(inputs=[str(DEMO / "html" / "library"), str(DEMO / "html" / "faq")], shards=2, langid=False)
    run(Config(**base), tmp_path / "plain")
    run(Config(**base, extract_timeout=10.0, workers=2), tmp_path / "timed")
    a, b = check_conservation(tmp_path / "plain"), check_conservation(tmp_path / "timed")
    assert a["totals"] == b["totals"] and a["dropped_by_reason"] == b["dropped_by_reason"]
    assert (tmp_path / "plain" / "docs" / "part-00000.jsonl.zst").read_bytes() == \
        (tmp_path / "timed" / "docs" / "part-00000.jsonl.zst").read_bytes()


def test_trafilatura_extracts_the_demo_pages():
    pytest.importorskip("trafilatura")
    pages = demo_pages()
    out = pipeline(pages, HtmlExtract("trafilatura"))
    kept = [d for d in out if not d.dropped]
    assert len(kept) >= 0.9 * len(pages)  # it must not silently drop pages (see docs/RESOURCES)
    page = next(d for d in kept if d.meta["url"].endswith("library/copy.html"))
    assert page.meta["extractor"] == "trafilatura" and page.meta["format"] == "text"
    assert "Return a deep copy of x." in page.text
    assert "Created using Sphinx" not in page.text and "Navigation" not in page.text.split("\n")
    assert page.meta["title"].startswith("copy")
    # the Django pages in the demo WARC too
    log = ReadLog()
    warc = list(read_file(DEMO / "warc" / "django-docs.warc.gz", log))
    out = pipeline(warc, HtmlExtract("trafilatura", timeout=30.0))
    assert sum(not d.dropped for d in out) >= 0.9 * len(warc) > 0


def test_stage_with_trafilatura(tmp_path):
    pytest.importorskip("trafilatura")
    run(Config(inputs=[str(DEMO / "html" / "library")], extractor="trafilatura", shards=1, langid=False),
        tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["steps"][0]["name"] == "html_extract_v1" and stats["steps"][0]["dropped"] == {}
    assert stats["totals"]["docs_kept"] >= 1
