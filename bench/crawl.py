"""Crawler bench: pages/s against a local server with politeness off, and proof from the server's own access log that
with politeness on no host ever gets more requests than its rate allows.

    PYTHONPATH=. python bench/crawl.py [--pages 2000] [--rate 10]

The server (tests/crawl_server.py) runs in its own process and logs the arrival time of every request.  Scenarios:
  off      robots, rate limits and sitemaps off, 16 requests in flight: raw crawler throughput
  rate     host_rate=R on two host names of one server (127.0.0.1 and localhost are two hosts to the crawler)
  delay    robots.txt says Crawl-delay: 0.25 while host_rate=R: the slower of the two applies (4 requests/s)
For the polite runs it prints, per host, the smallest gap between two request arrivals and the largest number of
requests in any 1-second window [t, t+1), against the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def serve(log: Path, pages: int, robots: str | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "tests" / "crawl_server.py"), "--gen-pages", str(pages), "--log", str(log)]
    if robots:
        cmd += ["--robots", robots]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def crawl(out: Path, seeds: list[str], **kw) -> dict:
    from lmforge.crawl.stage import Config, run

    run(Config(seeds=seeds, max_depth=10_000, **kw), out, force=True)
    return json.loads((out / "stats.json").read_text())


def windows(times: list[float]) -> tuple[float, int]:
    """(smallest gap between consecutive arrivals in s, most arrivals in any window [t, t+1))."""
    times = sorted(times)
    gap = min((b - a for a, b in zip(times, times[1:])), default=float("inf"))
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0 + 1e-9:  # window (t-1, t]: the same maxima as [t, t+1)
            j += 1
        most = max(most, i - j + 1)
    return gap, most


def read_log(log: Path) -> dict[str, list[float]]:
    by_host: dict[str, list[float]] = defaultdict(list)
    for line in log.read_text().splitlines():
        t, host, _ = line.split("\t", 2)
        by_host[host].append(float(t))
    return by_host


def raw_clients(base: str, n: int = 600, conc: int = 16) -> dict[str, float]:
    """GETs/s of a bare fetch loop (no crawler) with httpx and with aiohttp: why the crawler uses aiohttp."""
    import asyncio

    import aiohttp
    import httpx

    async def run(get) -> float:
        todo = list(range(n))

        async def worker() -> None:
            while todo:
                await get(f"{base}/gen/{todo.pop()}")

        t = time.time()
        await asyncio.gather(*[worker() for _ in range(conc)])
        return n / (time.time() - t)

    async def with_httpx() -> float:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conc)) as c:
            async def get(u: str) -> None:
                (await c.get(u)).content
            return await run(get)

    async def with_aiohttp() -> float:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as c:
            async def get(u: str) -> None:
                async with c.get(u) as r:
                    await r.read()
            return await run(get)

    return {"httpx": asyncio.run(with_httpx()), "aiohttp": asyncio.run(with_aiohttp())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=2000, help="pages for the politeness-off run")
    ap.add_argument("--polite-pages", type=int, default=60, help="pages per host for the polite runs")
    ap.add_argument("--rate", type=float, default=10.0, help="host_rate (requests/s) for the polite runs")
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    tmp = Path(tempfile.mkdtemp(prefix="crawl-bench-"))
    os.environ.setdefault("LMFORGE_HOME", str(tmp / "home"))

    # 1. politeness off
    log = tmp / "off.log"
    proc, base = serve(log, args.pages, None)
    try:
        t0 = time.time()
        s = crawl(tmp / "off", [base + "/gen/0"], max_pages=args.pages, robots=False, sitemaps=False, host_rate=0,
                  concurrency=16, host_concurrency=16, timeout=30)
        wall = time.time() - t0
    finally:
        proc.kill()
    proc, base = serve(tmp / "raw.log", 1000, None)
    try:
        print("bare GET loop, 16 in flight, GETs/s: " + ", ".join(f"{k} {v:.0f}" for k, v in raw_clients(base).items()))
    finally:
        proc.kill()
    print(f"politeness off: {s['pages']['by_outcome']} pages in {s['session']['seconds']:.2f}s crawl "
          f"({wall:.2f}s with setup): {s['session']['pages_per_s']:.1f} pages/s; "
          f"{len(log.read_text().splitlines())} requests in the server log")

    # 2. per-host rate on two hosts, 3. robots.txt Crawl-delay
    for name, robots, limit in (("rate", "User-agent: *\nDisallow: /private/\n", args.rate),
                                ("delay", "User-agent: *\nCrawl-delay: 0.25\n", 4.0)):
        log = tmp / f"{name}.log"
        proc, base = serve(log, 10_000, robots)
        port = base.rsplit(":", 1)[1]
        seeds = [f"http://127.0.0.1:{port}/gen/0", f"http://localhost:{port}/gen/0"]
        try:
            s = crawl(tmp / name, seeds, max_pages=2 * args.polite_pages, robots=True, sitemaps=False,
                      host_rate=args.rate, concurrency=16, host_concurrency=4, timeout=30)
        finally:
            proc.kill()
        ok = True
        for host, times in sorted(read_log(log).items()):
            gap, most = windows(times)
            ok &= most <= limit
            print(f"{name}: host {host}: {len(times)} requests over {max(times) - min(times):.2f}s, smallest gap "
                  f"{gap * 1000:.1f} ms (interval {1000 / limit:.0f} ms), most in any 1 s window: {most} "
                  f"(limit {limit:g}) {'OK' if most <= limit else 'EXCEEDED'}")
        print(f"{name}: {s['session']['pages']} pages {s['pages']['by_outcome']}, {s['session']['pages_per_s']:.2f} "
              f"pages/s for both hosts; "
              f"per-host limit {'never exceeded' if ok else 'EXCEEDED'}")


if __name__ == "__main__":
    main()
