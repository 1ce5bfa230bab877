"""MCP tool round trip on loopback: `lmforge mcp serve` (calculator) over stdio and streamable HTTP, called through
lmforge's MCP client (``MCPTools.call``, what the agent loop does per tool call).  Prints p50 / p90 / p99 in ms.

    python bench/mcp_roundtrip.py [--calls 200]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from lmforge.agent import MCPTools


def measure(server: MCPTools, calls: int) -> list[float]:
    for _ in range(10):  # warm-up
        server.call("calculator", {"expression": "1+1"})
    out = []
    for i in range(calls):
        t = time.perf_counter()
        server.call("calculator", {"expression": f"{i} * 3"})
        out.append((time.perf_counter() - t) * 1000)
    return out


def report(name: str, ms: list[float]) -> None:
    q = statistics.quantiles(ms, n=100)
    print(f"{name:>6}: p50 {q[49]:.2f} ms  p90 {q[89]:.2f} ms  p99 {q[98]:.2f} ms  ({len(ms)} calls)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    serve = [sys.executable, "-m", "lmforge.cli", "mcp", "serve"]
    with MCPTools(serve) as server:
        report("stdio", measure(server, args.calls))
    proc = subprocess.Popen(serve + ["--transport", "http", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        while not (m := re.search(r"(http://\S+/mcp)", proc.stderr.readline())):
            pass
        with MCPTools(m.group(1)) as server:
            report("http", measure(server, args.calls))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
