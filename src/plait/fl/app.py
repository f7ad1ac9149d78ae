"""The apps Flower loads in a deployment: `plait.fl.app:server_app` and `plait.fl.app:client_app`.

The plait config travels in the run config as TOML text under "plait-config" (the app folder
that plait.fl.deploy writes puts it there), so the SuperLink's ServerApp and every SuperNode's
ClientApp build the same model and partitions. The server writes its history to
`<train.out_dir>/fl_history.json`.
"""

from __future__ import annotations

import functools
import logging
import tomllib
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from plait.config import Config, validate
from plait.errors import ConfigError

log = logging.getLogger(__name__)

RUN_CONFIG_KEY = "plait-config"
HISTORY_FILE = "fl_history.json"


@functools.lru_cache(maxsize=2)
def config_from_text(text: str) -> Config:
    """The validated plait config of a run config's TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run config {RUN_CONFIG_KEY!r} is not valid TOML: {exc}") from None
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg


def config_of(context: Context) -> Config:
    text = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"the Flower run config has no {RUN_CONFIG_KEY!r} (the plait config as TOML "
                          "text); write the app folder with `plait fl CONFIG --deploy-dir DIR`")
    return config_from_text(text)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from plait.fl.server import run_server

    cfg = config_of(context)
    result = run_server(grid, context, cfg)
    path = result.write(Path(cfg.train.out_dir) / HISTORY_FILE)
    log.warning("federated run finished: %d rounds, history in %s", cfg.fl.rounds, path)


@functools.lru_cache(maxsize=2)
def _client_for(text: str) -> ClientApp:
    from plait.fl.client import build_client_app
    return build_client_app(config_from_text(text))


class _ConfiguredClientApp(ClientApp):
    """Hands every message to the ClientApp built from the run's plait config (the Message-API
    app with its mods, or the legacy SecAgg+ client)."""

    def __call__(self, message: Message, context: Context) -> Message:
        config_of(context)  # a clear error when the run config lacks the plait config
        return _client_for(context.run_config[RUN_CONFIG_KEY])(message, context)


client_app = _ConfiguredClientApp()
