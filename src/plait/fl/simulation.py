"""The same ServerApp and ClientApp on Flower's own simulation runtime (Ray actors).

The in-process runner (plait.fl.runner) must agree with this runtime for the same config and
seeds: the apps, the partitions, the batch orders and Flower's node sampling do not depend on
the runtime. Ray starts in a few seconds and keeps to this machine (no dashboard, `num_cpus`
actors of one CPU each).
"""

from __future__ import annotations

import logging
import os

from plait.config import Config

log = logging.getLogger(__name__)


def run_simulation(cfg: Config, num_cpus: int = 2):
    """Run the federated job of `cfg` on Flower's simulation runtime; returns its
    :class:`~plait.fl.server.FederatedResult`."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flwr.simulation import run_simulation as flower_run_simulation

    from plait.fl.client import build_client_app
    from plait.fl.server import build_server_app

    results: list = []
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}
    flower_run_simulation(server_app=build_server_app(cfg, on_result=results.append),
                          client_app=build_client_app(cfg), num_supernodes=cfg.fl.clients,
                          backend_config=backend)
    if not results:
        from plait.errors import LaunchError
        raise LaunchError("Flower's simulation runtime finished without a result (see its log above)")
    return results[0]
