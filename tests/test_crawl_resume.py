"""An interrupted crawl (SIGINT, then SIGKILL) continues where it stopped: no finished page is fetched again, no WARC
record is lost, duplicated or cut, and the accounting still adds up."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from crawl_server import SiteServer  # noqa: E402
from test_crawl import assert_adds_up, responses, warcio_check  # noqa: E402

from lmforge.crawl.stage import Config, run  # noqa: E402
from ctrl_c import default_sigint

ROOT = Path(__file__).resolve().parents[1]
PAGES = 60


def config(seed: str) -> Config:
    return Config(seeds=[seed], max_depth=50, sitemaps=False, host_rate=25, host_concurrency=2, timeout=5,
                  warc_max_mb=0.01)  # a new WARC file every ~8 pages: rotation across interruptions too


def interrupt(seed: str, out: Path, sig: int, after_pages: int) -> tuple[float, set[str]]:
    """Run the crawl in a child process and send it ``sig`` once ``after_pages`` pages are logged; returns the time
    of the signal and the URLs the frontier had finished by then."""
    code = (f"from lmforge.crawl.stage import Config, run\n"
            f"run(Config.model_validate_json({config(seed).model_dump_json()!r}), {str(out)!r})\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    log = out / "crawl.log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= after_pages:
            break
        time.sleep(0.02)
    assert child.poll() is None, "the crawl ended before it could be interrupted:\n" + child.communicate()[0]
    child.send_signal(sig)
    at = time.time()
    output = child.communicate(timeout=60)[0]
    assert child.returncode != 0
    con = sqlite3.connect(out / "frontier.sqlite")
    done = {u for (u,) in con.execute("SELECT url FROM urls WHERE state='done'")}
    con.close()
    if sig == signal.SIGINT:
        assert "run the same command again to resume" in output
        assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"  # not failed
    return at, done


def test_resume_after_sigint_and_sigkill(tmp_path):
    out = tmp_path / "crawl"
    with SiteServer(gen_pages=PAGES, fanout=3) as site:
        seed = site.url("/gen/0")
        t1, done1 = interrupt(seed, out, signal.SIGINT, after_pages=8)
        assert not list((out / "warc").glob("*.open"))  # Ctrl-C closes the WARC file properly
        t2, done2 = interrupt(seed, out, signal.SIGKILL, after_pages=len(done1) + 10)
        assert len(done2) > len(done1)
        assert list((out / "warc").glob("*.open"))  # SIGKILL left the file being written
        m = run(config(seed), out)  # resumes: the same config, the same folder
        log = list(site.log)
    assert m.status == "done"
    stats = json.loads((out / "stats.json").read_text())
    assert_adds_up(stats)
    assert stats["pages"]["by_outcome"] == {"ok": PAGES} and stats["pages"]["queued"] == 0
    # no page that was finished before an interruption is requested after it
    for t, done in ((t1, done1), (t2, done2)):
        again = [p for ts, p, _ in log if ts > t and site.url(p) in done]
        assert again == []
    assert sum(1 for _, p, _ in log if p == "/robots.txt") == 1  # robots.txt is kept in the frontier too
    # every page has exactly one response record; the file cut by SIGKILL was repaired to its last whole record
    got = responses(out)
    assert sorted(u for u, _ in got) == sorted(site.url(f"/gen/{i}") for i in range(PAGES))
    files = sorted(p.name for p in (out / "warc").iterdir())
    assert len(files) == len(set(files)) > 3 and stats["warc"]["files"] == files
    warcio_check(out)


def test_recover_cuts_uncommitted_records(tmp_path):
    """Records written after the last commit (a kill between writing and committing) are cut off."""
    from lmforge.crawl.warc import WarcSink, recover

    opened = {}
    sink = WarcSink(tmp_path, "t", 10**9, 0, on_open=lambda name, off: opened.update({name: off}))
    page = dict(fetched_at=time.time(), request_headers=[("Host", "h")], http_version="HTTP/1.1", status=200,
                reason="OK", response_headers=[("Content-Type", "text/html")], metadata={"depth": "0"})
    name, end1 = sink.write_page(url="http://h/1", body=b"<p>one</p>", **page)
    sink.write_page(url="http://h/2", body=b"<p>two</p>", **page)  # never committed
    assert opened == {name: opened[name]} and 0 < opened[name] < end1
    assert recover(tmp_path, {name: end1}) == [name]
    from warcio.archiveiterator import ArchiveIterator

    with open(tmp_path / name, "rb") as f:
        kinds = [(r.rec_type, r.rec_headers.get_header("WARC-Target-URI")) for r in ArchiveIterator(f)]
    assert kinds == [("warcinfo", None), ("request", "http://h/1"), ("response", "http://h/1"),
                     ("metadata", "http://h/1")]


def test_a_larger_budget_extends_a_finished_crawl(tmp_path):
    out = tmp_path / "crawl"
    with SiteServer(gen_pages=PAGES, fanout=3) as site:
        cfg = Config(seeds=[site.url("/gen/0")], max_depth=50, sitemaps=False, host_rate=0, max_pages=10)
        first = run(cfg, out)
        assert first.metrics["fetched"] == 10 and first.metrics["queued"] > 0
        assert run(cfg, out).run_id == first.run_id  # the same budget: up to date
        second = run(cfg.model_copy(update={"max_pages": 25}), out)
        paths = [p for _, p, _ in site.log if p.startswith("/gen/")]
    assert second.run_id != first.run_id and second.fingerprint == first.fingerprint
    assert second.metrics["fetched"] == 25 and len(paths) == len(set(paths)) == 25  # nothing fetched twice
    assert len(responses(out)) == 25
    warcio_check(out)
