"""`plait serve --backend ray`: the same engine and OpenAI-compatible API as a Ray Serve deployment.

Each Ray Serve replica loads the model and runs one :class:`~plait.serve.engine.Engine` behind the
FastAPI app of :mod:`plait.serve.api` (through `serve.ingress`); Ray Serve's proxy spreads requests
over the replicas and its autoscaler adds and removes them by `autoscaling_config`, the same
settings (`min_replicas`, `max_replicas`, `target_ongoing_requests`, `upscale_delay_s`,
`downscale_delay_s`) that plait's own router takes. On one machine a local Ray instance is started;
with `address` ("auto", "ray://HOST:10001", ...) the deployment joins an existing cluster, whose
nodes need plait installed and the model at `path`.

Ray is an optional dependency (`pip install 'plait[ray]'`), imported only here and only when used.

    handle = start_ray("runs/tiny_gpt", port=8000, autoscaling={"min_replicas": 1, "max_replicas": 4})
    ...                     # OpenAI clients talk to handle.url + "/v1"
    handle.shutdown()
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from plait.errors import ConfigError
from plait.serve.engine import EngineConfig

log = logging.getLogger(__name__)

APP_NAME = "plait"
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                    "downscale_delay_s")


def autoscaling_config(autoscaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`autoscaling` checked (plait's rules, the router's) and completed with Ray Serve's defaults,
    as a Ray Serve `autoscaling_config`; None stays None (a fixed replica count)."""
    if autoscaling is None:
        return None
    from plait.serve.router.config import AutoscalingConfig

    unknown = sorted(set(autoscaling) - set(AUTOSCALING_KEYS))
    if unknown:
        raise ConfigError(f"autoscaling setting(s) {', '.join(map(repr, unknown))} are unknown; valid: "
                          f"{', '.join(AUTOSCALING_KEYS)}")
    cfg = AutoscalingConfig(**dict(autoscaling))
    cfg.check()
    return dataclasses.asdict(cfg)


def _replica_app(path: str, config: EngineConfig, api_key: str | None, device: str, model_name: str | None):
    """A builder Ray Serve calls in each replica: the engine and its FastAPI app."""

    def build():
        import sys

        from plait.serve.api import create_app
        from plait.serve.async_engine import AsyncEngine
        from plait.serve.engine import Engine
        from plait.serve.metrics import ServeMetrics

        sys.setswitchinterval(0.001)  # as `plait serve`: the event loop gets in between tensor ops
        engine = Engine.from_path(path, config=dataclasses.replace(config), device=device, name=model_name)
        return create_app(AsyncEngine(engine, ServeMetrics()), engine.name, api_key)

    return build


@dataclasses.dataclass
class RayServer:
    """A running deployment: `url` is the Ray Serve proxy; `shutdown()` removes the deployment
    (and stops Ray when it was started here)."""

    url: str
    started_ray: bool

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()


def start_ray(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              config: EngineConfig | None = None, autoscaling: Mapping[str, Any] | None = None,
              device: str = "cpu", model_name: str | None = None, address: str | None = None,
              replicas: int = 1, num_cpus: int | None = None, replica_cpus: float = 1.0,
              timeout_s: float = 300.0) -> RayServer:
    """Deploy the model at `path` on Ray Serve and return once it answers; does not block.

    `address`: an existing Ray cluster (None starts a local instance with `num_cpus` CPUs, all of
    this machine's by default). `replicas`: a fixed count when `autoscaling` is None.
    `replica_cpus`: CPUs Ray reserves per replica (also its torch threads, which Ray sets).
    """
    config = config or EngineConfig()
    config.check()
    scaling = autoscaling_config(autoscaling)
    if scaling is None and (not isinstance(replicas, int) or replicas < 1):
        raise ConfigError(f"replicas={replicas!r} must be an integer ≥ 1")
    if not 0 < replica_cpus:
        raise ConfigError(f"replica_cpus={replica_cpus!r} must be positive")
    if not 0 <= port <= 65535 or port == 0:
        raise ConfigError(f"--port {port} must be in [1, 65535] for the Ray Serve proxy")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("--backend ray needs Ray Serve: pip install 'plait[ray]'") from None

    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is not None:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
            started = True
    try:
        serve.start(http_options={"host": host, "port": port})
        options: dict[str, Any] = {
            "name": APP_NAME,
            "ray_actor_options": {"num_cpus": replica_cpus},
            # Each replica batches continuously and queues in its engine: let it take that many.
            "max_ongoing_requests": config.max_seqs + config.max_queue,
        }
        if scaling is not None:
            options["autoscaling_config"] = scaling
        else:
            options["num_replicas"] = replicas
        ingress = serve.ingress(_replica_app(str(path), config, api_key, device, model_name))()
        app = serve.deployment(ingress, **options).bind()
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        _wait_running(timeout_s)
    except BaseException:
        if started:
            serve.shutdown()
            ray.shutdown()
        raise
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    url = f"http://{shown}:{port}"
    log.info("Ray Serve deployment %r running at %s (%s)", APP_NAME, url,
             f"autoscaling {scaling}" if scaling else f"{replicas} replica(s)")
    return RayServer(url, started)


def _wait_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = str(getattr(status, "status", ""))
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED"):
            raise ConfigError(f"the Ray Serve deployment failed to start: {status.message}")
        if time.monotonic() > deadline:
            raise ConfigError(f"the Ray Serve deployment is not running after {timeout_s:.0f} s "
                              f"(status {state or 'unknown'})")
        time.sleep(0.2)


def serve_ray(path: str | Path, *, host: str, port: int, api_key: str | None, config: EngineConfig,
              autoscaling: Mapping[str, Any] | None, device: str, model_name: str | None,
              address: str | None = None, **options: Any) -> None:
    """`plait serve --backend ray`: deploy (see :func:`start_ray`, which takes `options`) and
    serve until interrupted (Ctrl-C or SIGTERM), then remove the deployment."""
    server = start_ray(path, host=host, port=port, api_key=api_key, config=config, autoscaling=autoscaling,
                       device=device, model_name=model_name, address=address, **options)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
