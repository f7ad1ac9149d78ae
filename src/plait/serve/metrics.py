"""Prometheus metrics of one server, in a registry of its own (so two servers in one process
do not clash)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; from a few milliseconds (a tiny model on a GPU) to a minute (a long queue on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Queue depth, running sequences, token throughput and latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("plait_queue_depth", "Requests waiting for a KV-cache slot", registry=r)
        self.running = Gauge("plait_running_sequences", "Sequences holding a KV-cache slot", registry=r)
        self.tokens_per_s = Gauge("plait_generation_tokens_per_second",
                                  f"Tokens generated per second over the last {window_s:g} s", registry=r)
        self.prompt_tokens = Counter("plait_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("plait_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("plait_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("plait_rejected_requests", "Requests refused before running, by HTTP status",
                                ["status"], registry=r)
        self.ttft = Histogram("plait_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("plait_time_per_output_token_seconds",
                              "Mean time between a request's generated tokens, after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("plait_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._recent_total = 0
        self._lock = threading.Lock()

    def record_tokens(self, n: int, now: float | None = None) -> None:
        """Count `n` generated tokens and refresh the tokens/s gauge."""
        now = time.perf_counter() if now is None else now
        self.generation_tokens.inc(n)
        with self._lock:
            # A running total: a step's update costs the same whatever the window holds.
            self._recent.append((now, n))
            self._recent_total += n
            while self._recent and self._recent[0][0] < now - self._window_s:
                self._recent_total -= self._recent.popleft()[1]
            self.tokens_per_s.set(self._recent_total / self._window_s)

    def record_finish(self, reason: str, arrival: float, first: float | None, end: float, tokens: int) -> None:
        self.requests.labels(finish_reason=reason).inc()
        if first is None:
            return
        self.e2e.observe(end - arrival)
        if tokens > 1:
            self.tpot.observe((end - first) / (tokens - 1))

    def render(self) -> bytes:
        # Decay the throughput gauge while idle, so a quiet server does not show its last burst.
        self.record_tokens(0)
        return generate_latest(self.registry)
