"""Running the API with uvicorn on a socket plait binds itself (so `--port 0` can report the
port the system chose)."""

from __future__ import annotations

import gc
import logging
import socket
from pathlib import Path
from typing import Any, Callable

from plait.errors import ConfigError, EngineDeadError
from plait.serve.api import create_app
from plait.serve.async_engine import AsyncEngine
from plait.serve.engine import Engine, EngineConfig
from plait.serve.engine_process import ProcessEngine
from plait.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on (host, port); port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in [0, 65535] (0 = any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --host/--port") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """The http:// URL a bound socket answers on."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def uvicorn_server(app, log_level: str = "warning"):
    """A uvicorn server for `app`, configured as every plait server runs (no access log, no
    websockets, 5 s to finish open streams on shutdown)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, ws="none",
                                         timeout_graceful_shutdown=5))


def serve_engine(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 on_ready: Callable[[str, Engine], None] | None = None, log_level: str = "warning") -> None:
    """Serve an already built engine (in-process or model-parallel) until interrupted (Ctrl-C or
    SIGTERM). Its steps run on a thread of this process."""
    import sys

    # The engine thread runs Python between its tensor operations; a shorter GIL switch interval
    # (5 ms by default) lets the event loop accept and stream between them with less delay.
    sys.setswitchinterval(0.001)
    _serve_app(AsyncEngine(engine, ServeMetrics()), engine, host, port, api_key, on_ready, log_level)


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          config: EngineConfig | None = None, device: str = "cpu", model_name: str | None = None,
          on_ready: Callable[[str, Any], None] | None = None, log_level: str = "warning") -> None:
    """Load the model at `path` and serve it until interrupted (Ctrl-C or SIGTERM). The engine
    runs in a process of its own (see :mod:`plait.serve.engine_process`); `on_ready` gets the
    URL and the engine's front (name, context)."""
    engine = ProcessEngine(path, config=config, device=device, name=model_name, metrics=ServeMetrics())

    def stop_with_engine(server) -> None:
        # A server without its engine stops (after failing what was in flight), so that whatever
        # supervises it (the router, a service manager) starts a new one, as vLLM's does.
        engine.on_death = lambda: setattr(server, "should_exit", True)

    try:
        _serve_app(engine, engine.engine, host, port, api_key, on_ready, log_level, before_run=stop_with_engine)
    finally:
        engine.close()
    if engine.died:
        raise EngineDeadError(f"the engine process of {engine.engine.name} died; the server stopped")


def _serve_app(engine, front, host: str, port: int, api_key: str | None,
               on_ready: Callable[[str, Any], None] | None, log_level: str,
               before_run: Callable[[Any], None] | None = None) -> None:
    """Serve `engine`'s app until shut down; `before_run` gets the uvicorn server first."""
    app = create_app(engine, front.name, api_key)
    # What exists now (modules, the model, the app) lives as long as the server: moved out of the
    # collector's reach, a full collection while serving walks only request-time objects, so it
    # pauses streams for less time.
    gc.collect()
    gc.freeze()
    sock = bind(host, port)
    if on_ready is not None:
        on_ready(url_of(sock), front)
    server = uvicorn_server(app, log_level)
    if before_run is not None:
        before_run(server)
    server.run(sockets=[sock])
