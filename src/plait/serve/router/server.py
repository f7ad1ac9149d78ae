"""Running the router: replicas first, then the API on the socket plait bound."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from plait.errors import LaunchError
from plait.serve.router.app import Router, create_router_app
from plait.serve.router.config import RouterConfig
from plait.serve.router.metrics import RouterMetrics
from plait.serve.router.replicas import NoReplicaError, ReplicaSet
from plait.serve.server import bind, url_of, uvicorn_server

log = logging.getLogger(__name__)


def replica_command(path: str | Path, args: list[str]) -> list[str]:
    """The command line of one replica: the single-replica `plait serve` on 127.0.0.1, any port."""
    return [sys.executable, "-m", "plait.cli", "serve", str(path), "--host", "127.0.0.1", "--port", "0", *args]


def serve_replicas(path: str | Path, replica_args: list[str], config: RouterConfig, host: str = "127.0.0.1",
                   port: int = 8000, api_key: str | None = None,
                   on_ready: Callable[[str, dict[str, Any] | None], None] | None = None,
                   log_level: str = "warning") -> None:
    """Serve `path` from replica processes behind a router until interrupted (Ctrl-C or SIGTERM).

    `replica_args`: `plait serve` options every replica gets (engine capacity, --tp/--pp, ...).
    `on_ready(url, models)` runs once the first replicas answer (`models`: their /v1/models
    body; None when starting from zero replicas). Raises LaunchError when replicas fail to start.
    """
    config.check()
    sock = bind(host, port)  # a port in use is refused before any replica starts
    try:
        asyncio.run(_serve(path, replica_args, config, sock, api_key, on_ready, log_level))
    finally:
        sock.close()


async def _serve(path, replica_args, config: RouterConfig, sock, api_key, on_ready, log_level) -> None:
    # Replicas listen on loopback under a key of their own: only the router talks to them.
    internal_key = secrets.token_urlsafe(24)
    env = dict(os.environ, PLAIT_API_KEY=internal_key, PYTHONUNBUFFERED="1")
    metrics = RouterMetrics()
    replicas = ReplicaSet(replica_command(path, replica_args), env, internal_key, config, metrics)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False,
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
    router = Router(replicas, client, config, metrics)
    try:
        try:
            await replicas.start(config.initial)
            models = await router.fetch_models() if config.initial else None
        except NoReplicaError as exc:
            raise LaunchError(f"replicas of {path} failed to start: {exc}") from None
        router.start()
        if on_ready is not None:
            on_ready(url_of(sock), models)
        await uvicorn_server(create_router_app(router, api_key), log_level).serve(sockets=[sock])
    finally:
        router.stop()
        await replicas.close()
        await client.aclose()
