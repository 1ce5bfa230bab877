"""HTML extraction: resiliparse vs trafilatura, and the cost of the per-page time limit (helper process).

Pages: every page of the Debian packages python3.11-doc and python-django-doc (real Sphinx pages with navigation,
sidebars, footers; index pages that are link lists).  Each configuration runs ``HtmlExtract`` over all pages; the
figure is pages per CPU-second, counting this process and the helper process it forks for ``--timeout`` (reaped
before the clock stops), plus how many pages came out with text and how many characters.

    .venv/bin/pip install trafilatura lxml_html_clean   # the optional extractor
    .venv/bin/python bench/data_extract_bench.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmforge.data.documents import Document
from lmforge.data.steps import HtmlExtract

DOC_DIRS = ["/usr/share/doc/python3.11/html", "/usr/share/doc/python-django-doc/html"]


def pages(limit: int) -> list[Document]:
    docs = []
    for d in DOC_DIRS:
        for f in sorted(Path(d).rglob("*.html")):
            docs.append(Document(str(f), f.read_text(errors="replace"), {"format": "html"}))
    return docs[:limit] if limit else docs


def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pages (0 = all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best is reported")
    args = ap.parse_args()
    html = pages(args.limit)
    print(f"{len(html):,} pages, {sum(len(d.text) for d in html) / 1e6:.1f} MB of HTML")
    configs = [("resiliparse", 0.0), ("resiliparse", 5.0), ("trafilatura", 0.0), ("trafilatura", 5.0)]
    for extractor, timeout in configs:
        try:
            HtmlExtract(extractor)
        except RuntimeError as err:
            print(f"{extractor}: not installed ({err})")
            continue
        best = None
        for _ in range(args.repeat if extractor == "resiliparse" else 1):
            docs = [Document(d.id, d.text, dict(d.meta)) for d in html]
            step = HtmlExtract(extractor, timeout=timeout)
            c0 = cpu()
            out = list(step(docs))
            spent = cpu() - c0
            best = spent if best is None else min(best, spent)
        kept = [d for d in out if not d.dropped]
        label = f"{extractor}, time limit {timeout:g} s" if timeout else f"{extractor}, no time limit"
        print(f"{label:34} {len(html) / best:7,.0f} pages/s/core  {len(kept):,}/{len(html):,} with text  "
              f"{sum(len(d.text) for d in kept) / 1e6:.2f} M chars  dropped {dict(step.stats.dropped)}")


if __name__ == "__main__":
    main()
