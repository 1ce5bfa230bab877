"""HTTP serving throughput and latency on SmolLM2-135M-Instruct, through the official ``openai`` client.

Starts ``lmforge serve`` as its own process on a loopback port (bfloat16 weights by default), as a user would, and
drives it from this process with the official client; at each concurrency level it
keeps that many streaming chat requests in flight until ``--requests-per-level`` (default: max(concurrency, 4)) have
finished.  Every request shares one system prompt (what the prefix cache saves) and asks a different question.
Prints, per level: aggregate generated tokens/s, requests/s, time to first token and end-to-end latency (p50/p95), and
the mean time per output token, as a markdown table.

    .venv/bin/python bench/serve_http.py [--concurrency 1,4,16,64] [--max-tokens 48] [--dtype bfloat16]

Timings depend on what else runs on the machine; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from openai import AsyncOpenAI

from lmforge.model.pretrained import materialize_smollm2

NAME = "smollm2-135m"
SYSTEM = ("You are a helpful assistant who answers questions about the Python programming language in two or three "
          "plain sentences, without code blocks.")
TOPICS = ["the with statement", "list comprehensions", "the global statement", "exceptions", "generators",
          "decorators", "the import system", "dictionaries", "string formatting", "the for loop", "lambda functions",
          "slicing", "the assert statement", "class definitions", "coroutines", "the yield expression"]


@dataclass
class Result:
    ttft: float
    e2e: float
    tokens: int
    chunks: list[float] = field(default_factory=list)  # arrival times (s after the request) of content chunks
    index: int = 0  # which question
    text: str = ""


def messages_for(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is {TOPICS[i % len(TOPICS)]} in Python? (question {i})"}]


async def one_request(client: AsyncOpenAI, i: int, max_tokens: int, **extra) -> Result:
    """One streaming chat request (``extra``: sampling fields, default temperature 0.7 seeded by ``i``)."""
    t0 = time.perf_counter()
    chunks: list[float] = []
    text = []
    tokens = 0
    extra = {"temperature": 0.7, "seed": i, **extra}
    stream = await client.chat.completions.create(
        model=NAME, messages=messages_for(i), max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(time.perf_counter() - t0)
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - t0
    return Result(chunks[0] if chunks else end, end, tokens, chunks, i, "".join(text))


async def level(url: str, concurrency: int, requests: int, max_tokens: int, **extra) -> tuple[float, list[Result]]:
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    todo = iter(range(requests))
    results: list[Result] = []

    async def worker() -> None:
        for i in todo:
            results.append(await one_request(client, i, max_tokens, **extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, results


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


@contextmanager
def lmforge_server(folder: Path, dtype: str, quantize: str | None = None, max_num_seqs: int = 64,
                   prefix_caching: bool = True, max_model_len: int = 512, threads: int | None = None) -> Iterator[str]:
    """``lmforge serve`` of ``folder`` in its own process on a free loopback port (``threads``: its
    ``OMP_NUM_THREADS``, default PyTorch's); yields its /v1 URL once healthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port), "--model-name", NAME,
           "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len), "--dtype", dtype,
           "--max-concurrent-requests", "1024"]
    cmd += ["--quantize", quantize] if quantize else []
    cmd += [] if prefix_caching else ["--no-prefix-caching"]
    print(f"model: {folder}  weights: {dtype}{' + ' + quantize if quantize else ''}  "
          f"max_num_seqs: {max_num_seqs}  threads: {threads or 'default'}  load: {load()}\n$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {' '.join(cmd)}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-level", type=int, default=0, help="0: max(concurrency, 4)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--no-prefix-caching", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]
    folder = materialize_smollm2()
    rows = []
    with lmforge_server(folder, args.dtype, args.quantize, args.max_num_seqs, not args.no_prefix_caching) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        asyncio.run(level(url, 1, 1, 4))  # warm-up
        for c in levels:
            n = args.requests_per_level or max(c, 4)
            wall, res = asyncio.run(level(url, c, n, args.max_tokens))
            toks = sum(r.tokens for r in res)
            tpot = statistics.mean((r.e2e - r.ttft) / max(r.tokens - 1, 1) for r in res)
            ttft, e2e = [r.ttft for r in res], [r.e2e for r in res]
            rows.append((c, n, toks / wall, n / wall, pct(ttft, .5), pct(ttft, .95), pct(e2e, .5), pct(e2e, .95), tpot))
            print(f"concurrency {c}: {n} requests, {toks} tokens in {wall:.1f} s  (load {load()})", flush=True)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()

    def counter(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", metrics, re.M))

    queries, hits = counter("vllm:prefix_cache_queries_total"), counter("vllm:prefix_cache_hits_total")
    print(f"\nprefix cache: {hits:.0f} of {queries:.0f} prompt tokens reused ({hits / max(queries, 1):.0%}); "
          f"load after: {load()}\n")
    print("| concurrency | requests | gen tok/s | req/s | TTFT p50 ms | TTFT p95 ms | e2e p50 s | e2e p95 s "
          "| TPOT ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, n, tps, rps, t50, t95, e50, e95, tpot in rows:
        print(f"| {c} | {n} | {tps:.1f} | {rps:.2f} | {t50 * 1000:.0f} | {t95 * 1000:.0f} | {e50:.2f} | {e95:.2f} "
              f"| {tpot * 1000:.0f} |")


if __name__ == "__main__":
    main()
