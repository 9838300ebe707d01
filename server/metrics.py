"""Prometheus metrics of the server (``GET /metrics``), names in SGLang's style with a ``dsv:`` prefix.

Counters and histograms are updated by :class:`dsv.server.engine_client.AsyncEngine` as outputs stream
out; gauges (running/queued requests, KV usage, prefix hit rate) are read from the engine at scrape time.
Each app gets its own registry so several servers can live in one process (tests).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class ServerMetrics:
    """The metric objects of one server and their update hooks."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, ("model_name", *extra), registry=r)

        self.requests = counter("dsv:requests", "Finished requests by finish reason", ("finish_reason",))
        self.rejected = counter(
            "dsv:rejected_requests", "Requests refused before reaching the engine", ("reason",)
        )
        self.prompt_tokens = counter("dsv:prompt_tokens", "Prompt tokens of finished requests").labels(
            **labels
        )
        self.generation_tokens = counter("dsv:generation_tokens", "Generated tokens").labels(**labels)
        self.ttft = Histogram(
            "dsv:time_to_first_token_seconds",
            "Time to first token",
            ["model_name"],
            registry=r,
            buckets=_TTFT_BUCKETS,
        ).labels(**labels)
        self.itl = Histogram(
            "dsv:inter_token_latency_seconds",
            "Time between tokens",
            ["model_name"],
            registry=r,
            buckets=_ITL_BUCKETS,
        ).labels(**labels)
        self.e2e = Histogram(
            "dsv:e2e_request_latency_seconds",
            "Request latency",
            ["model_name"],
            registry=r,
            buckets=_E2E_BUCKETS,
        ).labels(**labels)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, ["model_name"], registry=r).labels(**labels)

        self.running = gauge("dsv:num_running_reqs", "Sequences being decoded or prefilled")
        self.queued = gauge("dsv:num_queue_reqs", "Sequences waiting for KV pages or a batch slot")
        self.kv_usage = gauge(
            "dsv:kv_cache_usage_ratio", "Share of KV pages in use (cached prefixes excluded)"
        )
        self.kv_used = gauge("dsv:kv_cache_used_pages", "KV pages in use")
        self.kv_total = gauge("dsv:kv_cache_total_pages", "KV pages in the pool")
        self.prefix_hit = gauge(
            "dsv:prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache"
        )
        self.preemptions = gauge("dsv:num_preemptions", "Sequences preempted since start")
        self._labels = labels

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason, **self._labels).inc()

    def on_finish(self, finish_reason: str, prompt_tokens: int, e2e_s: float) -> None:
        self.requests.labels(finish_reason=finish_reason, **self._labels).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e.observe(e2e_s)

    def render(self, stats: Any) -> bytes:
        """The text exposition, with gauges refreshed from an :class:`EngineStats` snapshot."""
        if stats is not None:
            self.running.set(stats.num_running)
            self.queued.set(stats.num_waiting)
            self.kv_used.set(stats.kv_pages_used)
            self.kv_total.set(stats.kv_pages_total)
            self.kv_usage.set(stats.kv_pages_used / max(1, stats.kv_pages_total))
            self.prefix_hit.set(stats.prefix_hit_rate)
            self.preemptions.set(stats.num_preemptions)
        return generate_latest(self.registry)
