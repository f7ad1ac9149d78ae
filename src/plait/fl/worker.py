"""One process's client side: the plait model and the data partitions, built once, and a
client's local training round on a Flower train message."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from plait.config import Config
from plait.data.digits import N_CLASSES
from plait.fl.attacks import flip_labels, malicious_clients
from plait.fl.local import LocalWork, evaluate, train_locally
from plait.fl.records import ARRAYS, METRICS, WEIGHT, load_arrays, model_arrays
from plait.fl.task import build_model, load_federated_data

UNIT_WEIGHT = "unit-weight"  # every client weighs the same (central DP needs it for its bound)
CONFIG = "config"  # the ConfigRecord key Flower's strategies send their settings under


def round_seed(seed: int, server_round: int, partition: int) -> int:
    """The batch-order seed of one client in one round: the same in every runtime."""
    return ((seed * 1_000_003 + server_round) * 10_007 + partition) % (2 ** 62)


class ClientWorker:
    """One process's client side: the model and the data partitions, built once."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = build_model(cfg)
        self.data = load_federated_data(cfg)
        self.attackers = (malicious_clients(cfg.fl.clients, cfg.fl.malicious_share, cfg.fl.seed)
                          if cfg.fl.attack != "none" else set())
        self._datasets: dict[int, object] = {}

    def dataset(self, pid: int):
        if pid not in self._datasets:
            self._datasets[pid] = self.data.client(pid)
        return self._datasets[pid]

    def straggler_steps(self, server_round: int, pid: int, planned: int) -> int | None:
        """A straggler's cut-short step count this round (None: a full round)."""
        share = self.cfg.fl.stragglers
        if share <= 0 or planned <= 1:
            return None
        rng = np.random.default_rng([self.cfg.fl.seed, server_round, pid, 0x57A6])
        if rng.random() >= share:
            return None
        return int(rng.integers(1, planned))  # 1 … planned−1 steps: partial work

    def train(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        config = msg.content.config_records.get(CONFIG, ConfigRecord())
        server_round = int(config.get("server-round", 0))
        load_arrays(self.model, msg.content.array_records[ARRAYS])
        data = self.dataset(pid)
        work = LocalWork.from_config(self.cfg, float(config.get("proximal-mu", 0.0)), server_round)
        cut = self.straggler_steps(server_round, pid, work.planned_steps(len(data)))
        targets = (flip_labels(N_CLASSES) if self.cfg.fl.attack == "label_flip" and pid in self.attackers
                   else None)
        result = train_locally(self.model, data, work, self.cfg, seed=round_seed(self.cfg.fl.seed, server_round, pid),
                               max_steps=cut, targets=targets)
        metrics = MetricRecord({"train-loss": result.loss, WEIGHT: result.examples, UNIT_WEIGHT: 1,
                                "local-steps": result.steps, "partial": int(cut is not None)})
        return Message(RecordDict({ARRAYS: model_arrays(self.model), METRICS: metrics}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        load_arrays(self.model, msg.content.array_records[ARRAYS])
        data = self.dataset(pid)
        out = evaluate(self.model, data, self.cfg)
        metrics = MetricRecord({**{f"eval-{k}": v for k, v in out.items()}, WEIGHT: len(data)})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)
