"""The ClientApp: a data holder trains the plait model on its partition and replies.

Built from the config (:func:`build_client_app`); the same app runs in the in-process runner,
in Flower's simulation runtime and on a SuperNode. Its mods, outermost first: compression of
the update, Flower's local DP, and the attack harness for attacking clients.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from plait.config import Config
from plait.fl.attacks import MODEL_ATTACKS, AttackMod, malicious_clients
from plait.fl.worker import UNIT_WEIGHT, ClientWorker, round_seed

__all__ = ["UNIT_WEIGHT", "ClientWorker", "build_client_app", "client_mods", "round_seed"]

log = logging.getLogger(__name__)


def client_mods(cfg: Config) -> list:
    """The mods of the ClientApp, outermost first."""
    f = cfg.fl
    mods: list = []
    if f.compression != "none":
        from plait.fl.compress import CompressionMod
        mods.append(CompressionMod(f.compression, f.topk_ratio, f.powersgd_rank, f.seed, f.topk_values))
    if f.dp == "local":
        from flwr.clientapp.mod import LocalDpMod
        mods.append(LocalDpMod(f.dp_clip, f.dp_clip, f.dp_epsilon, f.dp_delta))
    if f.attack in MODEL_ATTACKS:
        mods.append(AttackMod(f.attack, malicious_clients(f.clients, f.malicious_share, f.seed), f.attack_scale))
    return mods


def build_client_app(cfg: Config, outer_mods: list | None = None) -> ClientApp:
    """The ClientApp of a federated run of `cfg` (the legacy SecAgg+ client when
    fl.secure_aggregation is on: Flower runs SecAgg+ only through its legacy API).
    `outer_mods` go around plait's own mods (tests use them to send malformed replies)."""
    if cfg.fl.secure_aggregation:
        from plait.fl.secagg import build_secagg_client_app
        return build_secagg_client_app(cfg)
    app = ClientApp(mods=list(outer_mods or []) + client_mods(cfg))
    worker: list[ClientWorker] = []  # built on the first message, in the process that runs it

    def get() -> ClientWorker:
        if not worker:
            worker.append(ClientWorker(cfg))
        return worker[0]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return get().train(msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return get().evaluate(msg, context)

    return app
