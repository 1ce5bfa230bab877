"""The crawl stage: seed URLs → a polite, resumable crawl → WARC files that the data stage reads.

    from lmforge.crawl.stage import Config, run
    manifest = run(Config(seeds=["https://example.org/"], max_pages=100), "runs/crawl")
    # then: lmforge data run --inputs runs/crawl/warc

The folder holds ``warc/*.warc.gz`` (request + response + metadata records per page), ``frontier.sqlite`` (the
resumable frontier), ``crawl.log.jsonl`` (one line per page: URL, outcome, status, bytes, error), ``stats.json`` and
``manifest.json``.  Rerunning an interrupted crawl (Ctrl-C, SIGKILL, a crash) with the same config continues where it
stopped and fetches no finished page again.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.artifacts import Manifest, write_json
from lmforge.config import StageConfig
from lmforge.stages import begin, finished

STAGE = "crawl"
VERSION = "1"
DEFAULT_TYPES = ["text/html", "application/xhtml+xml", "text/plain"]


class Config(StageConfig):
    """Crawl the web politely from seed URLs into WARC files (robots.txt, per-host rate limits, resumable)."""

    seeds: list[str] = Field(default_factory=list,
                             description="Seed URLs (repeat the flag, or separate them by spaces), or files with one "
                                         "URL per line (# comments allowed).")
    max_pages: int = Field(1000, ge=0, description="Stop after fetching this many pages (0 = no limit).")
    max_depth: int = Field(5, ge=0, description="Follow links at most this many hops from a seed.")
    same_host: bool = Field(False, description="Only follow links to the hosts of the seeds.")
    allow: list[str] = Field(default_factory=list, description="Only admit URLs matching one of these regexes.")
    deny: list[str] = Field(default_factory=list, description="Never admit URLs matching one of these regexes.")
    max_pages_per_host: int = Field(10_000, ge=1, description="Admit at most this many URLs per host (trap guard).")
    max_url_length: int = Field(1024, ge=16, description="Refuse longer URLs (trap guard).")
    max_query_params: int = Field(8, ge=0, description="Refuse URLs with more query parameters (trap guard).")
    max_path_repeats: int = Field(3, ge=1, description="Refuse URLs repeating one path segment more often "
                                                       "(/a/b/a/b/a/b…, trap guard).")
    robots: bool = Field(True, description="Obey robots.txt: disallows, Crawl-delay, Request-rate.")
    sitemaps: bool = Field(True, description="Read each host's sitemaps (robots.txt Sitemap: lines, /sitemap.xml).")
    max_sitemaps_per_host: int = Field(10, ge=0, description="Read at most this many sitemaps per host.")
    host_rate: float = Field(1.0, ge=0, description="Max requests per second to one host (0 = no limit); robots.txt "
                                                    "Crawl-delay can only slow it down.")
    host_concurrency: int = Field(2, ge=1, description="Max requests in flight to one host without a rate limit (with "
                                                       "one, requests to a host go one at a time).")
    concurrency: int = Field(16, ge=1, description="Max requests in flight in all.")
    timeout: float = Field(30.0, gt=0, description="Seconds one request may take, body included.")
    retries: int = Field(2, ge=0, description="Retries after a 5xx response or a network error (not after a 4xx).")
    retry_backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubled for each next one.")
    max_redirects: int = Field(5, ge=0, description="Follow at most this many redirects in a chain.")
    max_bytes: int = Field(5_000_000, ge=1, description="Skip pages larger than this (bytes, after decoding).")
    content_types: list[str] = Field(default_factory=lambda: list(DEFAULT_TYPES),
                                     description="Content types kept (2xx responses of other types are not read).")
    warc_max_mb: float = Field(100.0, gt=0, description="Start a new WARC file past this size (MB).")
    user_agent: str = Field("", description="User-Agent header (default: lmforge/VERSION with the crawler's "
                                            "purpose); robots.txt groups are matched against it.")


def default_user_agent() -> str:
    from lmforge import __version__

    return f"lmforge/{__version__} (+https://pypi.org/project/lmforge/; language-model data crawler)"


def read_seeds(specs: list[str]) -> list[str]:
    """Canonical seed URLs from URLs and seed files; a ``ValueError`` names the bad seed (and its file:line)."""
    from lmforge.crawl.urls import check_seed

    seeds: list[str] = []
    for spec in specs:
        path = Path(spec)
        if "://" not in spec and path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    seeds.append(check_seed(line, f"{line!r} ({path}:{n})"))
        elif "://" not in spec:
            raise ValueError(f"crawl: seed {spec!r} is neither an existing file nor an http(s) URL")
        else:  # one URL, or several separated by whitespace
            seeds += [check_seed(url, repr(url)) for url in spec.split()]
    if not seeds:
        raise ValueError("crawl: no seed URLs given (--seeds URL or --seeds FILE)")
    return list(dict.fromkeys(seeds))


def clean(out: Path) -> None:
    """Remove what an earlier (different) crawl left in ``out``."""
    shutil.rmtree(out / "warc", ignore_errors=True)
    for name in ("frontier.sqlite", "frontier.sqlite-wal", "frontier.sqlite-shm", "crawl.log.jsonl", "stats.json"):
        (out / name).unlink(missing_ok=True)


def crawl_stats(crawler: Any, frontier: Any, seconds: float, status: str) -> dict[str, Any]:
    """Accounting of the whole crawl (all sessions): discovered = admitted + refused; admitted = done + queued."""
    outcomes = frontier.outcomes()
    rejected = frontier.rejected()
    queued = frontier.count("queued")
    done = sum(outcomes.values())
    written = sum(n for o, n in outcomes.items() if o in ("ok", "redirect") or o.startswith("http_"))
    per_host: dict[str, Any] = {}
    for host, outcome, n in frontier.con.execute(
            "SELECT host, COALESCE(outcome, 'queued'), COUNT(*) FROM urls GROUP BY 1, 2").fetchall():
        per_host.setdefault(host, {"pages": {}})["pages"][outcome] = n
    for host, note in crawler.host_notes.items():
        per_host.setdefault(host, {"pages": {}}).update(note)
    nbytes = frontier.con.execute("SELECT COALESCE(SUM(bytes), 0) FROM urls WHERE warc_file IS NOT NULL").fetchone()[0]
    return {
        "status": status,
        "discovered": {"total": done + queued + sum(rejected.values()), "admitted": done + queued,
                       "refused": sum(rejected.values()), "refused_by_reason": rejected},
        "pages": {"done": done, "queued": queued, "written_to_warc": written, "fetched": crawler.fetched,
                  "by_outcome": outcomes},
        "bytes_written": nbytes,
        "hosts": per_host,
        "warc": {"files": sorted(p.name for p in (crawler.sink.folder).glob("*.warc.gz"))},
        "session": {"pages": crawler.processed, "seconds": round(seconds, 3),
                    "pages_per_s": round(crawler.processed / seconds, 2) if seconds > 0 else None,
                    "requests": dict(crawler.requests)},
    }


def _can_extend(out: Path, config: Config, inputs: dict[str, str]) -> bool:
    """True when ``out`` holds a finished crawl of the same fingerprint that stopped at its page budget with URLs
    still queued, and ``config`` allows more pages than it fetched."""
    from lmforge.artifacts import StageRun

    probe = StageRun(STAGE, VERSION, out, config.model_dump(), inputs, {"concurrency", "max_pages"})
    prev = probe.previous()
    if prev is None or prev.status != "done" or prev.fingerprint != probe.fingerprint:
        return False
    more = not config.max_pages or config.max_pages > prev.metrics.get("fetched", 0)
    return bool(prev.metrics.get("queued")) and more


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    import asyncio

    try:
        import aiohttp  # noqa: F401
        import protego  # noqa: F401
        import warcio  # noqa: F401
    except ImportError as err:
        raise ValueError(f"crawl needs the {err.name!r} package: pip install 'lmforge[crawl]'") from None

    from lmforge.crawl.crawler import Crawler
    from lmforge.crawl.frontier import Frontier, Link
    from lmforge.crawl.urls import UrlRules, host_of
    from lmforge.crawl.warc import WarcSink, recover
    from lmforge.progress import console, progress, rate_text

    seeds = read_seeds(config.seeds)  # a bad seed fails here, before any folder is touched
    out = Path(out_dir)
    inputs = {f"seeds{i}": s for i, s in enumerate(config.seeds) if "://" not in s}
    # max_pages is a budget, not part of what is crawled: a finished crawl rerun with a larger budget continues from
    # its frontier (fetching no page again) instead of starting over
    extend = not force and _can_extend(out, config, inputs)
    stage_run = begin(STAGE, VERSION, out, config.model_dump(), inputs=inputs, force=force or extend,
                      execution_fields={"concurrency", "max_pages"})
    if stage_run is None:
        return finished(out)
    resume = extend or (stage_run.resumable() and not force)
    with stage_run:
        if not resume:
            clean(out)
        rules = UrlRules(max_depth=config.max_depth, same_host=config.same_host,
                         seed_hosts={host_of(s) for s in seeds}, allow=config.allow, deny=config.deny,
                         max_url_length=config.max_url_length, max_query_params=config.max_query_params,
                         max_path_repeats=config.max_path_repeats)
        frontier = Frontier(out / "frontier.sqlite", rules, config.max_pages_per_host)
        warc_dir = out / "warc"
        warc_dir.mkdir(parents=True, exist_ok=True)
        recovered = recover(warc_dir, frontier.committed_warcs())
        if extend:
            console.print(f"  extending the finished crawl to {config.max_pages or 'unlimited'} pages", highlight=False)
        if resume:
            console.print(f"  resuming: {frontier.count('done'):,} pages done, {frontier.count('queued'):,} queued"
                          + (f", {len(recovered)} WARC file(s) closed after the interruption" if recovered else ""),
                          highlight=False)
        else:
            frontier.add([Link(s, s, 0, "seed") for s in seeds])
        sink = WarcSink(warc_dir, f"crawl-{stage_run.run_id}", int(config.warc_max_mb * 1e6),
                        first_index=len(frontier.committed_warcs()), on_open=frontier.warc_opened)
        log = open(out / "crawl.log.jsonl", "a", encoding="utf-8")
        crawler = Crawler(config, frontier, sink, log, config.user_agent or default_user_agent())
        start = time.time()
        status = "failed"
        try:
            with progress() as bar:
                task = bar.add_task("crawl", total=config.max_pages or None, completed=crawler.fetched, rate="")

                def tick(c: Crawler) -> None:
                    bar.update(task, completed=c.fetched,
                               rate=rate_text(c.processed, time.time() - start, "pages"))

                asyncio.run(crawler.run(tick))
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            console.print(f"[yellow]crawl interrupted: {frontier.count('done'):,} pages done, "
                          f"{frontier.count('queued'):,} queued; run the same command again to resume[/]",
                          highlight=False)
            raise
        finally:
            sink.close()
            log.close()
            stats = crawl_stats(crawler, frontier, time.time() - start, status)
            write_json(out / "stats.json", stats)
            frontier.close()
            stage_run.metrics.update(
                pages=stats["pages"]["done"], fetched=stats["pages"]["fetched"],
                pages_ok=stats["pages"]["by_outcome"].get("ok", 0),
                queued=stats["pages"]["queued"], refused=stats["discovered"]["refused"],
                errors=sum(n for o, n in stats["pages"]["by_outcome"].items() if o.startswith("error:")),
                bytes=stats["bytes_written"], warc_files=len(stats["warc"]["files"]),
                hosts=len(stats["hosts"]), pages_per_s=stats["session"]["pages_per_s"],
                outcomes=stats["pages"]["by_outcome"], refused_by_reason=stats["discovered"]["refused_by_reason"],
            )
        pages = stats["pages"]
        console.print(f"[green]✓ crawl[/]: {pages['written_to_warc']:,} pages written "
                      f"({pages['by_outcome'].get('ok', 0):,} ok), {pages['done'] - pages['written_to_warc']:,} "
                      f"skipped, {stats['discovered']['refused']:,} URLs refused, {pages['queued']:,} left queued; "
                      f"{stats['session']['pages_per_s'] or 0:,.1f} pages/s → {out}", highlight=False)
    return finished(out)
