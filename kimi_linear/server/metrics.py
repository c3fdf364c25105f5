"""Prometheus metrics with vLLM's names under the `kimi_linear:` prefix, labelled with model_name.

Gauges (running / waiting requests, MLA cache, KDA state-slot and prefix-cache snapshot usage) are read
from the engine at scrape time, and so are the prefix-cache counters (`prefix_cache_queries_total`,
`prefix_cache_hits_total`, in tokens: advanced by the engine's totals since the last scrape); other
counters and histograms are fed as requests progress. Each server owns its registry, so
several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kimi_linear.engine.llm_engine import EngineStats

P = "kimi_linear:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None] | None = None):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        self._stats = stats
        lbl = ["model_name"]
        self.running = Gauge(P + "num_requests_running", "Requests in model execution batches.", lbl, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be scheduled.", lbl, registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "Fraction of MLA latent-cache blocks in use (0-1).",
                              lbl, registry=r)
        self.state_usage = Gauge(P + "kda_state_usage_perc", "Fraction of KDA state slots in use (0-1).",
                                 lbl, registry=r)
        self.snapshot_usage = Gauge(P + "kda_snapshot_usage_perc", "Fraction of the prefix cache's KDA state "
                                    "snapshots in use (0-1).", lbl, registry=r)
        self.prefix_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      lbl, registry=r)
        self.prefix_hits = Counter(P + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", lbl,
                                   registry=r)
        self._seen_prefix = (0, 0)  # the engine's (queries, hits) at the last scrape
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens processed.", lbl, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", lbl, registry=r)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               lbl + ["finished_reason"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between consecutive output tokens.", lbl,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.", lbl,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time spent waiting before the first step.",
                               lbl, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram(P + "request_prompt_tokens", "Prompt length of finished requests.", lbl,
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram(P + "request_generation_tokens", "Generated tokens per finished request.", lbl,
                                 buckets=_TOKEN_BUCKETS, registry=r)

    def request_finished(self, *, prompt_tokens: int, generation_tokens: int, finish_reason: str,
                         ttft: float | None, itls: list[float], e2e: float, queue_time: float | None) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generation_tokens)
        self.success.labels(m, finish_reason).inc()
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
        for x in itls:
            self.itl.labels(m).observe(x)
        self.e2e.labels(m).observe(e2e)
        if queue_time is not None:
            self.queue.labels(m).observe(queue_time)
        self.prompt_len.labels(m).observe(prompt_tokens)
        self.gen_len.labels(m).observe(generation_tokens)

    def render(self) -> bytes:
        if self._stats is not None:
            s = self._stats() or EngineStats()  # None while loading: report zeros
            m = self.model_name
            self.running.labels(m).set(s.num_running)
            self.waiting.labels(m).set(s.num_waiting)
            self.kv_usage.labels(m).set(s.kv_cache_usage)
            self.state_usage.labels(m).set(s.state_slot_usage)
            self.snapshot_usage.labels(m).set(s.snapshot_usage)
            q, h = self._seen_prefix
            if s.prefix_cache_queries >= q and s.prefix_cache_hits >= h:  # totals only grow (zeros while loading)
                self.prefix_queries.labels(m).inc(s.prefix_cache_queries - q)
                self.prefix_hits.labels(m).inc(s.prefix_cache_hits - h)
                self._seen_prefix = (s.prefix_cache_queries, s.prefix_cache_hits)
        return generate_latest(self.registry)
