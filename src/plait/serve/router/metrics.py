"""The router's Prometheus metrics, and its replicas' metrics merged under a `replica` label."""

from __future__ import annotations

import collections
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from plait.serve.metrics import LATENCY_BUCKETS

STATES = ("starting", "ready", "failed", "draining")


class RouterMetrics:
    """Replicas by state, the target count and scale events, load, retries and failovers."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.replicas = Gauge("plait_router_replicas", "Replica processes by state", ["state"], registry=r)
        self.target = Gauge("plait_router_target_replicas", "Replicas the router currently aims for", registry=r)
        self.scale_events = Counter("plait_router_scale_events", "Changes of the target replica count",
                                    ["direction"], registry=r)
        self.ongoing = Gauge("plait_router_ongoing_requests", "Requests in flight at replicas", registry=r)
        self.waiting = Gauge("plait_router_waiting_requests", "Requests held at the router for want of a "
                             "ready replica", registry=r)
        self.requests = Counter("plait_router_requests", "Completion requests routed, by kind", ["kind"],
                                registry=r)
        self.retries = Counter("plait_router_retries", "Requests (or the rest of a stream) sent again to "
                               "another replica after theirs failed", registry=r)
        self.busy_retries = Counter("plait_router_busy_retries", "Requests sent to another replica after "
                                    "one answered 429 (its queue full)", registry=r)
        self.replica_starts = Counter("plait_router_replica_starts", "Replica processes started", registry=r)
        self.replica_failures = Counter("plait_router_replica_failures", "Replicas that died or stopped "
                                        "answering (each is replaced)", registry=r)
        self.start_time = Histogram("plait_router_replica_start_seconds", "Replica start to ready",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.failover = Histogram("plait_router_failover_seconds", "A replica's failure seen by a request to "
                                  "that request running on another replica (a stream: its next event)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        # The latest failovers, for /health: when each request's replica failed and when it ran again.
        self.recent_failovers: collections.deque[dict] = collections.deque(maxlen=100)
        for state in STATES:
            self.replicas.labels(state=state)
        for direction in ("up", "down"):
            self.scale_events.labels(direction=direction)

    def record_failover(self, seen: float, kind: str) -> None:
        """A request whose replica failed at monotonic time `seen` runs again on another (now)."""
        now = time.monotonic()
        self.failover.observe(now - seen)
        wall = time.time()
        self.recent_failovers.append({"kind": kind, "failed": wall - (now - seen), "resumed": wall})

    def render(self, replica_texts: dict[int, str] | None = None) -> bytes:
        """The router's metrics, then every replica's, each sample labelled with its replica id."""
        out = generate_latest(self.registry)
        if replica_texts:
            merged = _Merged(replica_texts)
            out += generate_latest(merged)
        return out


class _Merged:
    """A collector of replicas' exposition texts: one family per metric name, with a `replica` label."""

    def __init__(self, texts: dict[int, str]):
        self._families: dict[str, object] = {}
        for rid, text in sorted(texts.items()):
            for family in text_string_to_metric_families(text):
                have = self._families.setdefault(family.name, family)
                samples = [s._replace(labels={**s.labels, "replica": str(rid)}) for s in family.samples]
                if have is family:
                    family.samples = samples
                else:
                    have.samples.extend(samples)

    def collect(self):
        return list(self._families.values())
