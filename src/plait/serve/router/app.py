"""The router's HTTP API: the same routes as one replica's (`plait.serve.api`), served by replicas.

/v1/completions goes to the ready replica with the fewest requests in flight (see `proxy`);
/v1/models is the replicas' answer (cached); /health reports the router and each replica;
/metrics has the router's metrics and every ready replica's, labelled by replica.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from plait.serve.api import error, guard_api
from plait.serve.router.autoscaler import Autoscaler
from plait.serve.router.config import RouterConfig
from plait.serve.router.metrics import RouterMetrics
from plait.serve.router.proxy import ACQUIRE_TIMEOUT_S, Proxy
from plait.serve.router.replicas import NoReplicaError, ReplicaSet

METRICS_TIMEOUT_S = 2.0


class Router:
    """The replica set, the proxy and (with autoscaling) the control loop, for one app."""

    def __init__(self, replicas: ReplicaSet, client: httpx.AsyncClient, config: RouterConfig,
                 metrics: RouterMetrics):
        self.replicas, self.client, self.config, self.metrics = replicas, client, config, metrics
        self.proxy = Proxy(replicas, client, config, metrics)
        self.autoscaler = Autoscaler(config.autoscaling, config.look_back_s) if config.autoscaling else None
        self.models: dict[str, Any] | None = None
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        if self.autoscaler is not None:
            self._loop_task = asyncio.create_task(self._control_loop())

    def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def _control_loop(self) -> None:
        rs, scaler = self.replicas, self.autoscaler
        while True:
            now = time.monotonic()
            scaler.observe(now, rs.ongoing + rs.waiting)
            target = scaler.decide(now, rs.target, rs.waiting)
            if target != rs.target:
                rs.set_target(target, f"{scaler.ongoing:.1f} ongoing requests, target "
                                      f"{scaler.config.target_ongoing_requests:g} per replica")
            await asyncio.sleep(self.config.tick_s)

    async def fetch_models(self) -> dict[str, Any]:
        if self.models is None:
            r = await self.replicas.acquire(ACQUIRE_TIMEOUT_S)
            try:
                resp = await self.client.get(f"{r.url}/v1/models", headers=self.replicas.headers)
                resp.raise_for_status()
                self.models = resp.json()
            finally:
                self.replicas.release(r)
        return self.models

    def health(self) -> dict[str, Any]:
        rs = self.replicas
        return {"status": "ok" if rs.error is None else "unavailable", "target_replicas": rs.target,
                "ready_replicas": rs.count("ready"), "ongoing_requests": rs.ongoing, "waiting_requests": rs.waiting,
                "replicas": [r.info() for r in rs.replicas], "scale_events": list(rs.events),
                "failovers": list(self.metrics.recent_failovers),
                "autoscaling": None if self.autoscaler is None else vars(self.autoscaler.config)}

    async def metrics_text(self) -> bytes:
        ready = [r for r in self.replicas.replicas if r.state == "ready" and r.url]

        async def one(r) -> str | None:
            try:
                resp = await self.client.get(f"{r.url}/metrics", headers=self.replicas.headers,
                                             timeout=METRICS_TIMEOUT_S)
                return resp.text if resp.status_code == 200 else None
            except httpx.HTTPError:
                return None
        texts = await asyncio.gather(*(one(r) for r in ready))
        return self.metrics.render({r.id: t for r, t in zip(ready, texts) if t is not None})


def create_router_app(router: Router, api_key: str | None = None) -> FastAPI:
    """The FastAPI app of `router`; with `api_key`, every request needs `Authorization: Bearer KEY`."""
    app = FastAPI(title="plait router", docs_url=None, redoc_url=None, openapi_url=None)

    guard_api(app, api_key)

    @app.get("/health")
    async def health():
        body = router.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(await router.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        try:
            return await router.fetch_models()
        except (NoReplicaError, httpx.HTTPError) as exc:
            return error(503, f"no replica answered /v1/models: {exc}", type_="server_error", code="no_replica")

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not valid JSON: {exc}")
        if isinstance(body, dict) and body.get("stream") is True:
            return await router.proxy.stream(body)
        return await router.proxy.whole(raw, request)

    return app
