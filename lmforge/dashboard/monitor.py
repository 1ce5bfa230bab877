"""Serving monitor and playground helpers: scrape a server's Prometheus ``/metrics`` (vLLM metric names, which
``lmforge serve`` exports), summarise it, read this machine's CPU/RAM (psutil) and GPUs (NVML when present)."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

import httpx

from lmforge.dashboard.store import PageError

KEY_GAUGES = {
    "vllm:num_requests_running": "running requests",
    "vllm:num_requests_waiting": "waiting requests",
    "vllm:kv_cache_usage_perc": "KV-cache use (1 = full)",
}
KEY_COUNTERS = {
    "vllm:prompt_tokens": "prompt tokens (total)",
    "vllm:generation_tokens": "generated tokens (total)",
    "vllm:request_success": "finished requests (total)",
}
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "time to first token (s)",
    "vllm:time_per_output_token_seconds": "time per output token (s)",
    "vllm:e2e_request_latency_seconds": "end-to-end latency (s)",
}


def check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PageError(f"{url!r} is not an http(s) URL of a server, e.g. http://127.0.0.1:8000", 400)
    return url.strip().rstrip("/")


def server_root(url: str) -> str:
    """``http://host:port`` of a server given as its root or its ``/v1`` base URL."""
    url = check_url(url)
    return url[:-3] if url.endswith("/v1") else url


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile from cumulative histogram buckets ``[(upper bound, count)]`` (linear within a bucket, as
    Prometheus' ``histogram_quantile``)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lo_bound
            return lo_bound + (bound - lo_bound) * ((rank - lo_count) / (count - lo_count) if count > lo_count else 0)
        lo_bound, lo_count = bound, count
    return buckets[-1][0]


def scrape(url: str, timeout: float = 3.0) -> dict[str, Any]:
    """``{"url", "gauges": {label: value}, "counters": {...}, "latency": {label: {p50, p90, p99, count}},
    "families": n}`` from ``url``/metrics; an unreachable server or a non-Prometheus answer is a PageError."""
    from prometheus_client.parser import text_string_to_metric_families

    target = server_root(url) + "/metrics"
    try:
        resp = httpx.get(target, timeout=timeout)
    except httpx.HTTPError as err:
        raise PageError(f"cannot reach {target}: {type(err).__name__}: {err or 'no answer'}. Is the server running "
                        f"(lmforge serve MODEL --port N)?", 502) from None
    if resp.status_code != 200:
        raise PageError(f"{target} answered HTTP {resp.status_code}", 502)
    try:
        families = list(text_string_to_metric_families(resp.text))
    except (ValueError, TypeError) as err:
        raise PageError(f"{target} is not Prometheus text: {err}", 502) from None
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    latency: dict[str, dict[str, float | None]] = {}
    for fam in families:
        name = fam.name
        if name in KEY_GAUGES:
            gauges[KEY_GAUGES[name]] = sum(s.value for s in fam.samples)
        elif name in KEY_COUNTERS or name + "_total" in KEY_COUNTERS:
            counters[KEY_COUNTERS.get(name) or KEY_COUNTERS[name + "_total"]] = sum(
                s.value for s in fam.samples if s.name.endswith("_total") or s.name == name)
        elif name in HISTOGRAMS:
            buckets: dict[float, float] = {}
            count = 0.0
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif s.name.endswith("_count"):
                    count += s.value
            pairs = list(buckets.items())
            latency[HISTOGRAMS[name]] = {"p50": quantile(pairs, 0.5), "p90": quantile(pairs, 0.9),
                                         "p99": quantile(pairs, 0.99), "count": count}
    return {"url": target, "gauges": gauges, "counters": counters, "latency": latency, "families": len(families)}


def machine() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import psutil

        vm = psutil.virtual_memory()
        out.update(cpu_percent=psutil.cpu_percent(interval=None), cpus=psutil.cpu_count(),
                   ram_used_gb=round((vm.total - vm.available) / 2**30, 2), ram_total_gb=round(vm.total / 2**30, 2),
                   ram_percent=vm.percent, load=list(psutil.getloadavg()))
    except ImportError:
        out["problem"] = "psutil is not installed (pip install psutil)"
    gpus = []
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            gpus.append({"index": i, "name": str(pynvml.nvmlDeviceGetName(h)), "util_percent": util.gpu,
                         "mem_used_gb": round(mem.used / 2**30, 2), "mem_total_gb": round(mem.total / 2**30, 2)})
    except Exception:  # noqa: BLE001 - no NVML library or no NVIDIA GPU: simply no GPU rows
        pass
    out["gpus"] = gpus
    return out
