"""Prometheus metrics for the server, under vLLM's metric names so existing dashboards and alerts work unchanged.

| metric | kind | meaning |
|---|---|---|
| ``vllm:num_requests_running`` | gauge | sequences in the running batch |
| ``vllm:num_requests_waiting`` | gauge | sequences queued for a cache slot |
| ``vllm:gpu_cache_usage_perc`` | gauge | fraction of KV-cache positions in use (0..1; the cache lives on CPU here) |
| ``vllm:kv_cache_usage_perc`` | gauge | the same, under vLLM's newer name |
| ``vllm:time_to_first_token_seconds`` | histogram | arrival → first token |
| ``vllm:time_per_output_token_seconds`` | histogram | gap between consecutive tokens of a sequence |
| ``vllm:e2e_request_latency_seconds`` | histogram | arrival → finish |
| ``vllm:prompt_tokens_total`` | counter | prompt tokens prefilled |
| ``vllm:generation_tokens_total`` | counter | tokens generated |
| ``vllm:request_success_total`` | counter | finished sequences, by ``finished_reason`` |
| ``vllm:prefix_cache_queries_total`` | counter | prompt tokens looked up in the prefix cache |
| ``vllm:prefix_cache_hits_total`` | counter | of those, tokens whose keys/values were reused, not recomputed |
| ``vllm:spec_decode_num_draft_tokens_total`` | counter | draft tokens proposed (speculative decoding) |
| ``vllm:spec_decode_num_accepted_tokens_total`` | counter | of those, accepted |
| ``vllm:spec_decode_num_emitted_tokens_total`` | counter | tokens emitted by speculative steps (accepted + one) |
| ``lmforge:spec_decode_request_acceptance_rate`` | histogram | per finished request: accepted / drafted |
| ``lmforge:spec_decode_request_tokens_per_step`` | histogram | per finished request: tokens per target forward pass |
| ``lmforge:spec_decode_request_speedup`` | histogram | per finished request: estimated decode speed-up |

Each app gets its own ``CollectorRegistry``, so several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

from lmforge.serve.engine import Engine, EngineMetrics

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
RATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STEP_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
SPEEDUP_BUCKETS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)


class PrometheusMetrics(EngineMetrics):
    """The engine's hooks, recorded as Prometheus metrics labelled with ``model_name``."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, labels, registry=r).labels(model_name).set_function(fn)

        gauge("vllm:num_requests_running", "Number of requests in the running batch.", lambda: engine.num_running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting for a cache slot.", lambda: engine.num_waiting)
        gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (1 = full).", lambda: engine.kv_cache_usage)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", lambda: engine.kv_cache_usage)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token.", labels,
                              buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests.", labels + ["finished_reason"],
                                registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels, registry=r).labels(model_name)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels,
                                   registry=r).labels(model_name)
        self.spec_drafts = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", labels,
                                   registry=r).labels(model_name)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", labels,
                                     registry=r).labels(model_name)
        self.spec_emitted = Counter("vllm:spec_decode_num_emitted_tokens", "Tokens emitted by speculative steps.",
                                    labels, registry=r).labels(model_name)
        self.spec_rate = Histogram("lmforge:spec_decode_request_acceptance_rate", "Per request: accepted / drafted.",
                                   labels, buckets=RATE_BUCKETS, registry=r).labels(model_name)
        self.spec_per_step = Histogram("lmforge:spec_decode_request_tokens_per_step",
                                       "Per request: tokens per target forward pass.", labels, buckets=STEP_BUCKETS,
                                       registry=r).labels(model_name)
        self.spec_speedup = Histogram("lmforge:spec_decode_request_speedup",
                                      "Per request: estimated decode speed-up over one-token steps.", labels,
                                      buckets=SPEEDUP_BUCKETS, registry=r).labels(model_name)
        self.model_name = model_name

    def on_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.inc(num_tokens)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def on_output_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.generation_tokens.inc()

    def on_finish(self, seq_prompt_tokens: int, completion_tokens: int, reason: str, e2e_seconds: float) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.e2e.observe(e2e_seconds)

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def on_speculation(self, draft_tokens: int, accepted_tokens: int, emitted_tokens: int) -> None:
        self.spec_drafts.inc(draft_tokens)
        self.spec_accepted.inc(accepted_tokens)
        self.spec_emitted.inc(emitted_tokens)

    def on_speculative_request(self, stats: dict) -> None:
        if stats.get("acceptance_rate") is not None:
            self.spec_rate.observe(stats["acceptance_rate"])
        if stats.get("tokens_per_step") is not None:
            self.spec_per_step.observe(stats["tokens_per_step"])
        if stats.get("speedup") is not None:
            self.spec_speedup.observe(stats["speedup"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
