"""The crawl stage against a local site (tests/crawl_site + misbehaving routes, served on 127.0.0.1)."""

from __future__ import annotations

import glob
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from crawl_server import SiteServer  # noqa: E402

from lmforge.crawl.stage import Config, run  # noqa: E402
from lmforge.crawl.urls import UrlRules, canonicalize  # noqa: E402

FAST = dict(host_rate=0, timeout=1.0, retries=1, retry_backoff=0.01, max_bytes=100_000, concurrency=8,
            host_concurrency=4)


def responses(out: Path) -> list[tuple[str, int]]:
    """(URL, HTTP status) of every response record in a crawl's WARC files (warcio reads them)."""
    from warcio.archiveiterator import ArchiveIterator

    got = []
    for f in sorted(glob.glob(str(out / "warc" / "*.warc.gz"))):
        with open(f, "rb") as fh:
            for rec in ArchiveIterator(fh):
                if rec.rec_type == "response":
                    got.append((rec.rec_headers.get_header("WARC-Target-URI"), rec.http_headers.get_statuscode()))
    return got


def warcio_check(out: Path) -> None:
    files = sorted(glob.glob(str(out / "warc" / "*.warc.gz")))
    assert files and not glob.glob(str(out / "warc" / "*.open"))
    p = subprocess.run([sys.executable, "-c", "import sys; from warcio.cli import main; main(sys.argv[1:])",
                        "check", "-v", *files], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "digest pass" in p.stdout and "fail" not in p.stdout


def assert_adds_up(stats: dict) -> None:
    d, p = stats["discovered"], stats["pages"]
    assert d["total"] == d["admitted"] + d["refused"] == d["admitted"] + sum(d["refused_by_reason"].values())
    assert d["admitted"] == p["done"] + p["queued"] == sum(p["by_outcome"].values()) + p["queued"]


def test_canonical_urls_and_trap_rules():
    assert canonicalize("HTTP://Example.COM:80/a/./b/../c?b=2&a=1&utm_source=x#top") == "http://example.com/a/c?a=1&b=2"
    assert canonicalize("https://example.com:443") == "https://example.com/"
    from lmforge.crawl.stage import read_seeds

    assert read_seeds(["http://a.org/x http://B.org", "http://a.org/x"]) == ["http://a.org/x", "http://b.org/"]
    assert canonicalize("../x y", "http://h.org/a/b/") == "http://h.org/a/x%20y"
    assert canonicalize("http://h.org/%7euser/") == "http://h.org/~user/"
    for bad in ("mailto:a@b.org", "ftp://h.org/x", "not a url", "http://[bad"):
        with pytest.raises(ValueError):
            canonicalize(bad)
    rules = UrlRules(max_depth=2, same_host=True, seed_hosts={"http://h.org"}, deny=[r"/private/"],
                     max_url_length=60, max_query_params=2, max_path_repeats=2)
    assert rules.reject("http://h.org/a", 2) is None
    assert rules.reject("http://h.org/a", 3) == "depth"
    assert rules.reject("http://other.org/a", 1) == "off_host"
    assert rules.reject("http://h.org/private/x", 1) == "denied"
    assert rules.reject("http://h.org/" + "x" * 60, 1) == "trap_url_length"
    assert rules.reject("http://h.org/c?a=1&b=2&c=3", 1) == "trap_query_params"
    assert rules.reject("http://h.org/a/b/a/b/a/", 1) == "trap_path_repeats"


def test_crawl_bundled_site(tmp_path):
    out = tmp_path / "crawl"
    with SiteServer(slow_s=2.5, huge_bytes=300_000) as site:
        m = run(Config(seeds=[site.url("/")], max_depth=6, **FAST), out)
        log = list(site.log)
    assert m.status == "done"
    stats = json.loads((out / "stats.json").read_text())
    assert_adds_up(stats)
    db = sqlite3.connect(out / "frontier.sqlite")
    outcome = {u[len(site.base):]: (o, via) for u, o, via in db.execute("SELECT url, outcome, via FROM urls")}
    hits = lambda path: sum(1 for _, p, _ in log if p == path)  # noqa: E731

    for page in ("/", "/about.html", "/history.html", "/garden.html", "/rivers.html", "/docs/readme.txt", "/gz"):
        assert outcome[page][0] == "ok", page
    assert outcome["/orphan.html"] == ("ok", "sitemap")                 # found through robots.txt's Sitemap: line
    assert outcome["/private/secret.html"][0] == "robots" and hits("/private/secret.html") == 0
    assert outcome["/redirect"][0] == "redirect" and hits("/about.html") == 1  # the target is fetched once
    assert outcome["/loop-a"][0] == outcome["/loop-b"][0] == "redirect"
    assert hits("/loop-a") == hits("/loop-b") == 1
    assert stats["discovered"]["refused_by_reason"]["redirect_loop"] == 1
    assert outcome["/missing.html"][0] == "http_404" and hits("/missing.html") == 1      # 4xx: not retried
    assert outcome["/error500"][0] == "http_500" and hits("/error500") == 2             # 5xx: retried once
    assert outcome["/slow"][0] == "error:timeout" and hits("/slow") == 2
    assert outcome["/huge"][0] == outcome["/huge-stream"][0] == "size_limit"
    assert outcome["/data.json"][0] == outcome["/photo.png"][0] == "content_type"
    assert outcome["/garbage"][0] == outcome["/truncated"][0] == "error:protocol"
    assert "?utm_source=nav" not in "".join(outcome) and "/rivers.html" in outcome     # canonical, tracking dropped
    # traps: the calendar stops at max_depth, the ever-deeper archive at the path-repeat limit
    assert sum(1 for u in outcome if u.startswith("/calendar/")) == 11
    refused = stats["discovered"]["refused_by_reason"]
    assert refused["depth"] >= 2 and refused["trap_path_repeats"] >= 1 and refused["trap_query_params"] >= 1
    assert refused["bad_url"] == 2 and refused["dedup"] > 0                          # mailto: and http://[bad
    assert all("lmforge/" in ua for _, _, ua in log)
    errors = [json.loads(line) for line in (out / "crawl.log.jsonl").read_text().splitlines()]
    why = {e["url"][len(site.base):]: e["error"] for e in errors}
    assert "Content-Length 300,0" in why["/huge"]
    assert "body passed 100,000 bytes; stopped reading" in why["/huge-stream"]
    garbage = next(e for e in errors if e["url"].endswith("/garbage"))
    assert garbage["error"].startswith(site.url("/garbage")) and "protocol" in garbage["error"]

    # WARC: one response per fetched page (with its status), request/metadata records, digests that warcio checks
    got = responses(out)
    written = {o: n for o, n in stats["pages"]["by_outcome"].items()
               if o in ("ok", "redirect") or o.startswith("http_")}
    assert len(got) == len(set(u for u, _ in got)) == sum(written.values()) == stats["pages"]["written_to_warc"]
    assert (site.url("/error500"), "500") in got and (site.url("/redirect"), "301") in got
    warcio_check(out)
    from warcio.archiveiterator import ArchiveIterator

    with open(next((out / "warc").glob("*.warc.gz")), "rb") as f:
        gz = next(r for r in ArchiveIterator(f) if r.rec_type == "response"
                  and r.rec_headers.get_header("WARC-Target-URI") == site.url("/gz"))
        body = gz.content_stream().read()
    # stored decoded, as Common Crawl does: the original encoding is kept as X-Crawler-Content-Encoding
    assert b"Sent with gzip." in body and gz.http_headers.get_header("X-Crawler-Content-Encoding") == "gzip"
    assert gz.http_headers.get_header("Content-Encoding") is None
    assert gz.http_headers.get_header("Content-Length") == str(len(body))


def test_crawl_then_data_stage_and_lineage(tmp_path, monkeypatch):
    """`lmforge crawl` (flags) → `lmforge data run --inputs OUT/warc` → documents whose meta.url is the fetched URL,
    and `lmforge lineage DATA` shows the crawl run."""
    from typer.testing import CliRunner

    from lmforge import cli
    from lmforge.data.io import iter_documents

    runner = CliRunner()
    with SiteServer() as site:
        seeds = tmp_path / "seeds.txt"
        seeds.write_text(f"# the test site\n{site.url('/')}\n")
        r = runner.invoke(cli.app, ["crawl", "--seeds", str(seeds), "--out", str(tmp_path / "crawl"), "--max-depth",
                                    "1", "--same-host", "--deny", "/(slow|huge|garbage|truncated|error500)",
                                    "--host-rate", "0", "--timeout", "2"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli.app, ["data", "run", "--inputs", str(tmp_path / "crawl" / "warc"), "--out",
                                str(tmp_path / "data"), "--shards", "1"])
    assert r.exit_code == 0, r.output
    fetched = {u for u, status in responses(tmp_path / "crawl") if status == "200"}
    docs = list(iter_documents(tmp_path / "data"))
    assert len(docs) >= 4
    assert {d["meta"]["url"] for d in docs} <= fetched
    assert site.url("/history.html") in {d["meta"]["url"] for d in docs}
    r = runner.invoke(cli.app, ["lineage", str(tmp_path / "data"), "--json"])
    tree = json.loads(r.output)
    crawl = tree["inputs"]["raw0"]
    assert crawl["stage"] == "crawl" and crawl["path"] == str((tmp_path / "crawl").resolve())
    assert crawl["config"]["seeds"] == [str(seeds)] and crawl["config"]["same_host"] is True


def test_recipe_chains_crawl_into_data(tmp_path):
    from lmforge.recipe import load_recipe, run_recipe

    with SiteServer() as site:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"""name: crawled
workspace: {tmp_path / 'ws'}
stages:
  crawl:
    seeds: ["{site.url('/about.html')}"]
    max_depth: 1
    allow: ["/(about|history|garden|rivers)\\\\.html$"]
    host_rate: 0
  data:
    inputs: ["@crawl/warc"]
    shards: 1
""")
        results = run_recipe(load_recipe(recipe))
        assert [r.kind for r in results] == ["crawl", "data"]
        assert results[1].manifest.metrics["docs_kept"] == 4
        from lmforge.registry import lineage

        crawled = lineage(tmp_path / "ws" / "data")["inputs"]["raw0"]
        assert crawled["stage"] == "crawl" and crawled["run_id"] == results[0].manifest.run_id
        # a later re-crawl into the same folder is not what the data run read
        again = run(Config(**results[0].manifest.config), tmp_path / "ws" / "crawl", force=True)
        assert again.run_id != results[0].manifest.run_id
        assert lineage(tmp_path / "ws" / "data")["inputs"]["raw0"]["run_id"] == results[0].manifest.run_id


def test_politeness_limits_and_malformed_robots(tmp_path, capsys):
    """A robots.txt with junk lines still applies its rules (and says which lines it ignored); its Crawl-delay spaces
    the requests; max_pages_per_host stops an infinite calendar."""
    robots = ("User-agent: *\nDisallow: /\n\n"  # the group for lmforge applies, not this one
              "User-agent: lmforge\nDisallow: /calendar/2026/03/\nCrawl-delay: 0.05\n"
              "\x00\xff{{not a rule\nAllow /oops\n")
    with SiteServer(robots=robots) as site:
        m = run(Config(seeds=[site.url("/calendar/2026/01/")], max_depth=100, max_pages_per_host=8, sitemaps=False,
                       **FAST), tmp_path / "c")
        cal = [p for _, p, _ in site.log if p.startswith("/calendar/")]
        arrivals = sorted(t for t, _, _ in site.log)
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert_adds_up(stats)
    host = stats["hosts"][site.base]
    assert host["robots"] == "ok" and host["robots_bad_lines"] == 2 and host["interval_s"] == 0.05
    assert "robots.txt: 2 malformed line(s)" in capsys.readouterr().err
    assert stats["discovered"]["admitted"] == 8 and stats["discovered"]["refused_by_reason"]["host_limit"] >= 1
    assert "/calendar/2026/03/" not in cal and stats["pages"]["by_outcome"]["robots"] == 1
    # with a delay, the next request starts only after the previous one ended + the delay: by causality the server
    # (its own clock) never sees two requests closer together, however loaded the machine
    assert min(b - a for a, b in zip(arrivals, arrivals[1:])) >= 0.05
    assert m.metrics["pages"] == 8


def test_bad_seeds_are_named(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"seed 'example\.org/page' is neither an existing file nor an http"):
        run(Config(seeds=["example.org/page"]), tmp_path / "c")
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("https://example.org/\nftp://example.org/file\n")
    with pytest.raises(ValueError, match=r"seeds\.txt:2\).*not an http\(s\) URL"):
        run(Config(seeds=[str(seeds)]), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    # the CLI prints one line, no traceback
    from lmforge import cli

    monkeypatch.setattr(sys, "argv", ["lmforge", "crawl", "--seeds", "not a url", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "seed 'not a url' is neither an existing file" in err
    assert "Traceback" not in err


def test_datatrove_reads_the_warc(tmp_path):
    try:
        from datatrove.pipeline.readers import WarcReader

        reader = WarcReader(str(tmp_path / "c" / "warc"), glob_pattern="*.warc.gz")
    except ImportError as err:
        pytest.skip(f"datatrove's WarcReader is not usable here: {err}")
    with SiteServer() as site:
        run(Config(seeds=[site.url("/about.html")], max_depth=0, sitemaps=False, **FAST), tmp_path / "c")
    docs = list(reader.run())
    assert [d.metadata["url"] for d in docs] == [site.url("/about.html")]
    assert "neighbours" in docs[0].text


def test_robots_unavailable_and_host_concurrency(tmp_path, capsys):
    """robots.txt answering 503 keeps the crawler off the host (RFC 9309); without a rate limit, at most
    host_concurrency requests reach one host at once (counted by the server)."""
    with SiteServer(robots_status=503) as site:
        run(Config(seeds=[site.url("/"), site.url("/about.html")], **FAST), tmp_path / "a")
        paths = [p for _, p, _ in site.log]
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["pages"]["by_outcome"] == {"robots_unavailable": 2} and paths == ["/robots.txt"] * 2  # 1 retry
    assert stats["hosts"][site.base]["robots"] == "unavailable"
    assert f"{site.base}/robots.txt unavailable (HTTP 503)" in capsys.readouterr().err
    with SiteServer(gen_pages=40, fanout=4, gen_delay_s=0.02) as site:
        run(Config(seeds=[site.url("/gen/0")], max_depth=50, sitemaps=False, **{**FAST, "host_concurrency": 3}),
            tmp_path / "b")
        assert 0 < site.max_inflight <= 3
    assert json.loads((tmp_path / "b" / "stats.json").read_text())["pages"]["by_outcome"] == {"ok": 40}


def test_sitemap_index_and_gzip():
    import gzip

    from lmforge.crawl.fetch import sitemap_locs

    index = b'<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">' \
            b"<sitemap><loc>https://h.org/a.xml.gz</loc></sitemap></sitemapindex>"
    assert sitemap_locs(index) == (["https://h.org/a.xml.gz"], True)
    urlset = (b"<urlset><url><loc> https://h.org/x?a=1&amp;b=2 </loc></url>"
              b"<url><loc>https://h.org/y</loc></url></urlset>")
    assert sitemap_locs(gzip.compress(urlset)) == (["https://h.org/x?a=1&b=2", "https://h.org/y"], False)
    assert sitemap_locs(b"\x1f\x8bnot gzip") == ([], False)


def test_an_unexpected_failure_on_one_page_is_counted(tmp_path, monkeypatch, capsys):
    import lmforge.crawl.crawler as crawler

    real = crawler.extract_links

    def fragile(body: bytes, charset):
        if b"About the Gazette" in body:
            raise RuntimeError("parser bug")
        return real(body, charset)

    monkeypatch.setattr(crawler, "extract_links", fragile)
    with SiteServer() as site:
        m = run(Config(seeds=[site.url("/about.html"), site.url("/rivers.html")], max_depth=0, **FAST), tmp_path / "c")
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert_adds_up(stats)
    assert m.status == "done" and stats["pages"]["by_outcome"] == {"error:internal": 1, "ok": 1}
    assert f"{site.url('/about.html')}: RuntimeError: parser bug" in capsys.readouterr().err


def test_frontier_claims_round_robin_within_host_limits(tmp_path):
    from collections import Counter

    from lmforge.crawl.frontier import Frontier, Link

    f = Frontier(tmp_path / "f.sqlite", UrlRules(), max_pages_per_host=100)
    urls = ["http://a.org/1", "http://a.org/2", "http://a.org/3", "http://b.org/1"]
    assert f.add([Link(u, u, 0, "seed") for u in urls + ["http://a.org/1#dup"]]) == 4
    assert f.rejected() == {"dedup": 1}
    busy: Counter = Counter()
    first = f.claim(busy, 1, [])
    busy[first.host] += 1
    second = f.claim(busy, 1, [first.id])
    assert {first.host, second.host} == {"http://a.org", "http://b.org"}  # the other host, not a.org's next URL
    busy[second.host] += 1
    assert f.claim(busy, 1, [first.id, second.id]) is None  # both hosts at their limit
    item = next(i for i in (first, second) if i.host == "http://b.org")
    f.finish(item, "ok")
    busy[item.host] -= 1
    assert f.claim(busy, 1, [first.id, second.id]) is None  # b.org has nothing left; a.org is busy
    third = f.claim(busy, 2, [first.id, second.id])
    assert third.url == "http://a.org/2"  # a.org's next URL, not the one in flight
    f.close()


def test_a_huge_robots_txt_is_read_up_to_500_kib(tmp_path, capsys):
    robots = "User-agent: *\nDisallow: /private/\n" + "# padding\n" * 60_000 + "Disallow: /about.html\n"
    with SiteServer(robots=robots) as site:
        run(Config(seeds=[site.url("/about.html"), site.url("/private/secret.html")], max_depth=0, sitemaps=False,
                   **FAST), tmp_path / "c")
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert stats["pages"]["by_outcome"] == {"ok": 1, "robots": 1}  # the rule past 500 KiB is not seen
    assert "robots.txt is larger than 512,000 bytes: only its start is read" in capsys.readouterr().err
