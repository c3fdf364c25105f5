"""Prometheus metrics with vLLM's names under the `kimi_linear:` prefix, labelled with model_name.

Three sources feed them:
- scrape time: gauges read from the engine's `stats()` (running / waiting requests, MLA cache, KDA
  state-slot and prefix-cache snapshot usage) and the prefix-cache counters (`prefix_cache_queries_total`,
  `prefix_cache_hits_total`, in tokens: advanced by the engine's totals since the last scrape);
- every engine step (`engine_step`): the token counters `prompt_tokens` / `generation_tokens` (so they move
  while a long prompt is prefilled or a long answer generated, not only when a request finishes),
  `num_preemptions` and the `iteration_tokens_total` histogram (tokens run per step);
- every finished request (`request_finished`): finish reasons and the latency histograms - TTFT, inter-token
  latency, end-to-end, and from the engine's own timestamps queue time (added -> first scheduled), prefill
  time (first scheduled -> first token), decode time (first -> last token) and inference time (first
  scheduled -> last token) - plus the prompt / generation length histograms.

Each server owns its registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import threading
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
        self._last = EngineStats()  # counters already exported (engine_step adds the difference)
        self._lock = threading.Lock()
        lbl = ["model_name"]

        def hist(name: str, doc: str, buckets=_LATENCY_BUCKETS) -> Histogram:
            return Histogram(P + name, doc, lbl, buckets=buckets, registry=r)

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
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens processed (counted every step).", lbl,
                                     registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generation tokens processed (counted every step).",
                                         lbl, registry=r)
        self.preemptions = Counter(P + "num_preemptions", "Cumulative number of preemptions from the engine.", lbl,
                                   registry=r)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens run through the model per engine step.",
                                     (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               lbl + ["finished_reason"], registry=r)
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive streamed output tokens.")
        self.tpot = hist("request_time_per_output_token_seconds", "Decode time per output token of each request.")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue = hist("request_queue_time_seconds", "Time from arrival in the engine to the first step that "
                                                        "schedules the request.")
        self.prefill = hist("request_prefill_time_seconds", "Time from first scheduled to the first token.")
        self.decode = hist("request_decode_time_seconds", "Time from the first to the last token.")
        self.inference = hist("request_inference_time_seconds", "Time from first scheduled to the last token.")
        self.prompt_len = hist("request_prompt_tokens", "Prompt length of finished requests.", _TOKEN_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Generated tokens per finished request.", _TOKEN_BUCKETS)

    def engine_step(self, s: EngineStats) -> None:
        """After an engine step: add what the engine's cumulative counters gained since the last call."""
        m = self.model_name
        with self._lock:
            last, self._last = self._last, s
        self.prompt_tokens.labels(m).inc(max(0, s.num_prompt_tokens - last.num_prompt_tokens))
        self.generation_tokens.labels(m).inc(max(0, s.num_generated_tokens - last.num_generated_tokens))
        self.preemptions.labels(m).inc(max(0, s.num_preemptions - last.num_preemptions))
        ran = s.num_scheduled_tokens - last.num_scheduled_tokens
        if ran > 0:
            self.iteration_tokens.labels(m).observe(ran)

    def request_finished(self, *, prompt_tokens: int, generation_tokens: int, finish_reason: str,
                         ttft: float | None, itls: list[float], e2e: float, queue_time: float | None = None,
                         prefill_time: float | None = None, decode_time: float | None = None,
                         inference_time: float | None = None) -> None:
        m = self.model_name
        self.success.labels(m, finish_reason).inc()
        for h, x in ((self.ttft, ttft), (self.queue, queue_time), (self.prefill, prefill_time),
                     (self.decode, decode_time), (self.inference, inference_time)):
            if x is not None:
                h.labels(m).observe(max(0.0, x))
        for x in itls:
            self.itl.labels(m).observe(x)
        if decode_time is not None and generation_tokens > 1:
            self.tpot.labels(m).observe(max(0.0, decode_time) / (generation_tokens - 1))
        self.e2e.labels(m).observe(e2e)
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
