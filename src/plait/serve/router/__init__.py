"""Data-parallel serving: replica processes behind a router that speaks the same HTTP API.

Each replica is the single-replica `plait serve` (its own engine, on 127.0.0.1); the router sends
each request to the ready replica with the fewest requests in flight, replaces a replica that
dies, carries a dead replica's requests (streams included, mid-way) over to a live one, and with
an :class:`AutoscalingConfig` scales between its bounds by ongoing requests, as Ray Serve does.
"""

from plait.serve.router.config import AutoscalingConfig, RouterConfig
from plait.serve.router.server import serve_replicas

__all__ = ["AutoscalingConfig", "RouterConfig", "serve_replicas"]
