"""Secure aggregation through Flower's SecAgg+ (Bell et al., 2020), which runs only on Flower's
legacy API: the server runs `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` over a
`LegacyContext` with the legacy FedAvg, and each client is a NumPyClient under `secaggplus_mod`.

Clients share keys, then send their (weighted, quantised) parameters masked with pairwise and
self masks; the server learns only the sum. A client that drops out after sharing its keys has
its pairwise masks rebuilt from the shares its neighbours hold, so the sum of the survivors
comes out (within the quantisation step). A Message-API client under this workflow would not
take part (it returns the initial weights and nothing fails), which is why this module keeps
its own legacy client around the same local training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from plait.config import Config
from plait.fl.worker import ClientWorker, round_seed
from plait.fl.local import LocalWork, train_locally
from plait.fl.strategies import per_round
from plait.fl.task import load_federated_data

log = logging.getLogger(__name__)


class SecAggClient(NumPyClient):
    """A legacy Flower client around plait's local training (parameters in state-dict order)."""

    def __init__(self, worker: ClientWorker, pid: int):
        self.worker, self.pid = worker, pid
        self.names = list(worker.model.state_dict())

    def get_parameters(self, config):
        return [v.detach().cpu().numpy() for v in self.worker.model.state_dict().values()]

    def fit(self, parameters, config):
        w = self.worker
        w.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.names, parameters)})
        data = w.dataset(self.pid)
        server_round = int(config.get("server-round", 0))
        result = train_locally(w.model, data, LocalWork.from_config(w.cfg, server_round=server_round), w.cfg,
                               seed=round_seed(w.cfg.fl.seed, server_round, self.pid))
        return self.get_parameters({}), result.examples, {"train-loss": result.loss}


def build_secagg_client_app(cfg: Config) -> ClientApp:
    """The legacy ClientApp under `secaggplus_mod`."""
    worker: list[ClientWorker] = []

    def client_fn(context: Context):
        if not worker:
            worker.append(ClientWorker(cfg))
        return SecAggClient(worker[0], int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def secagg_workflow(cfg: Config, max_weight: float) -> SecAggPlusWorkflow:
    """SecAgg+ with plait's shares and threshold. Clients scale their parameters by
    weight / max_weight before quantising: the largest client's size keeps that ratio ≤ 1 and the
    quantisation step as fine as it can be."""
    f = cfg.fl
    return SecAggPlusWorkflow(num_shares=f.secagg_shares, reconstruction_threshold=f.secagg_threshold,
                              max_weight=float(max_weight))


def run_secagg(grid: Grid, context: Context, cfg: Config, initial: ArrayRecord,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]) -> ArrayRecord:
    """Run the federated job with SecAgg+; returns the final parameters."""
    f = cfg.fl
    n, m = f.clients, per_round(cfg)
    names = list(initial.keys())

    def to_record(ndarrays) -> ArrayRecord:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(names, ndarrays)})

    def legacy_evaluate(server_round: int, ndarrays, config):
        out = evaluate_fn(server_round, to_record(ndarrays))
        if out is None:
            return None
        return float(out.get("loss", 0.0)), dict(out)

    strategy = LegacyFedAvg(fraction_fit=m / n, fraction_evaluate=0.0, min_fit_clients=m,
                            min_evaluate_clients=0, min_available_clients=n,
                            initial_parameters=ndarrays_to_parameters(initial.to_numpy_ndarrays()),
                            evaluate_fn=legacy_evaluate,
                            on_fit_config_fn=lambda rnd: {"server-round": rnd})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=f.rounds), strategy=strategy)
    largest = max(len(p) for p in load_federated_data(cfg).parts)
    DefaultWorkflow(fit_workflow=secagg_workflow(cfg, largest))(grid, legacy)
    return to_record(legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays())
