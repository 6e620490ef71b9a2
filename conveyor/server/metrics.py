"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Time to first token, inter-token latency, tool time, overlap saved, tool waits, KV blocks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_s = Histogram(
            "conveyor_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl_s = Histogram(
            "conveyor_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tool_s = Histogram(
            "conveyor_tool_execution_seconds",
            "Tool call time, start to result",
            ["tool"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.overlap_s = Counter(
            "conveyor_tool_overlap_saved_seconds",
            "Tool time that ran while the model was still decoding",
            registry=r,
        )
        self.requests = Counter("conveyor_requests", "Finished requests", ["finish_reason"], registry=r)
        self.tokens = Counter("conveyor_generated_tokens", "Generated tokens", registry=r)
        self.running = Gauge("conveyor_requests_running", "Requests in the engine", registry=r)
        self.awaiting_tools = Gauge(
            "conveyor_requests_awaiting_tools", "Requests waiting on tool results", registry=r
        )
        self.kv_used = Gauge("conveyor_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("conveyor_kv_blocks_total", "KV cache blocks", registry=r)
        self.kv_sessions = Gauge(
            "conveyor_kv_blocks_sessions",
            "KV cache blocks kept for the follow-ups of requests that ended with client tool calls",
            registry=r,
        )
        self.workers_busy = Gauge("conveyor_tool_workers_busy", "Tool workers serving a call", registry=r)
        self.worker_restarts = Counter(
            "conveyor_tool_worker_restarts",
            "Tool workers replaced after a crash, timeout or unacknowledged cancel",
            registry=r,
        )
        self.sandbox_refusals = Counter(
            "conveyor_tool_sandbox_refusals",
            "Tool-code actions the workers' sandbox refused (its audit hook)",
            registry=r,
        )
        self._workers_seen = (0, 0)  # the pool's totals at the last render

    def observe_finished(self, out: Any) -> None:
        """Counts from a request's last engine output (its timeline gives tool and overlap times)."""
        self.requests.labels(out.finish_reason or "unknown").inc()
        self.tokens.inc(out.num_output_tokens)
        spans = out.timeline or []
        decodes = [(s.start, s.end) for s in spans if s.kind == "decode"]
        for s in spans:
            if s.kind.startswith("tool:"):
                self.tool_s.labels(s.kind[5:]).observe(max(0.0, s.end - s.start))
                self.overlap_s.inc(sum(max(0.0, min(s.end, e) - max(s.start, b)) for b, e in decodes))

    def render(self, stats: Any, num_running: int) -> bytes:
        self.running.set(num_running)
        self.awaiting_tools.set(stats.num_awaiting_tools)
        self.kv_used.set(stats.num_used_blocks)
        self.kv_total.set(stats.num_blocks)
        self.kv_sessions.set(stats.num_session_blocks)
        workers = stats.workers
        self.workers_busy.set(workers.busy)
        restarts, refusals = self._workers_seen  # the pool keeps totals: count what is new
        self.worker_restarts.inc(max(0, workers.restarts - restarts))
        self.sandbox_refusals.inc(max(0, workers.refusals - refusals))
        self._workers_seen = (workers.restarts, workers.refusals)
        return generate_latest(self.registry)
