"""The ServerApp: one federated run of a plait config, and its per-round history.

The server builds the model from the seed (its initial parameters), the strategy of `[fl]`
behind plait's update guard (or FedBuff, or Flower's SecAgg+ workflow), evaluates the global
model on the held-out split every `fl.eval_every` rounds, and records for every round what the
clients uploaded, what was refused and why, and the privacy spent.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from plait.config import Config
from plait.fl.guard import RoundStats, UpdateGuard
from plait.fl.local import evaluate
from plait.fl.privacy import RDPAccountant, local_noise_multiplier
from plait.fl.records import load_arrays, model_arrays, numpy_arrays
from plait.fl.strategies import build_strategy, per_round, weight_key
from plait.fl.task import build_model, load_federated_data

log = logging.getLogger(__name__)


@dataclass
class FederatedResult:
    """A run's outcome: per-round records, the final parameters and the partitions."""

    history: list[dict[str, Any]]
    final: dict[str, np.ndarray]
    partitions: list[dict]
    strategy: str
    dropped: int = 0  # client replies that never came (the local runner's dropouts)
    extra: dict[str, Any] = field(default_factory=dict)

    def last(self, key: str, default: Any = None) -> Any:
        """The last recorded value of `key` (e.g. "accuracy")."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return default

    def first_round_reaching(self, key: str, target: float) -> int | None:
        """The first round whose `key` is ≥ `target`, or None."""
        for row in self.history:
            if row.get(key) is not None and row[key] >= target:
                return int(row["round"])
        return None

    def time_reaching(self, key: str, target: float) -> float | None:
        for row in self.history:
            if row.get(key) is not None and row[key] >= target:
                return float(row["time"])
        return None

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "history": self.history, "partitions": self.partitions,
                "dropped": self.dropped, **self.extra}

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return p


class Privacy:
    """The ε a run has spent: none, central (per released round) or local (per client release)."""

    def __init__(self, cfg: Config):
        f = cfg.fl
        self.kind, self.delta = f.dp, f.dp_delta
        self.accountant = RDPAccountant()
        self.q = per_round(cfg) / f.clients
        self.z = (f.dp_noise_multiplier if f.dp == "central"
                  else local_noise_multiplier(f.dp_epsilon, f.dp_delta) if f.dp == "local" else 0.0)
        self.releases = 0

    def after_round(self, aggregated: bool, most_participations: int) -> float | None:
        if self.kind == "none":
            return None
        if self.kind == "central" and aggregated:
            self.accountant.step(self.z, self.q)
        if self.kind == "local":  # the most-used client's releases, no amplification
            extra = most_participations - self.accountant.releases
            if extra > 0:
                self.accountant.step(self.z, 1.0, extra)
        return self.accountant.epsilon(self.delta)


def _stats_row(stats: RoundStats | None) -> dict[str, Any]:
    if stats is None:
        return {}
    return {"replies": stats.replies, "accepted": stats.accepted, "refused": len(stats.refused),
            "refused_reasons": [f"node {n}: {why}" for n, why in stats.refused],
            "partial": stats.partial, "upload_wire_bytes": stats.upload_wire_bytes,
            "upload_payload_bytes": stats.upload_payload_bytes, "aggregated": stats.aggregated}


def run_server(grid: Grid, context: Context, cfg: Config) -> FederatedResult:
    """The server side of a federated run of `cfg` over `grid`."""
    f = cfg.fl
    random.seed(f.seed)  # Flower's node sampling
    np.random.seed(f.seed)  # Flower's DP noise
    model = build_model(cfg)
    initial = model_arrays(model)
    data = load_federated_data(cfg)
    clock: Callable[[], float] = (lambda: float(grid.now)) if hasattr(grid, "now") else time.monotonic
    start = clock()
    history: list[dict[str, Any]] = []
    privacy = Privacy(cfg)
    participation: Counter = Counter()
    stats_of: Callable[[int], RoundStats | None] = lambda r: None

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row: dict[str, Any] = {"round": server_round, "time": clock() - start, **_stats_row(stats_of(server_round))}
        if server_round > 0:
            eps = privacy.after_round(bool(row.get("aggregated", True)), max(participation.values(), default=0))
            if eps is not None:
                row["epsilon"] = eps
        out = None
        if server_round % f.eval_every == 0 or server_round == f.rounds:
            load_arrays(model, arrays)
            metrics = evaluate(model, data.val, cfg)
            row.update(metrics)
            out = MetricRecord(metrics)
        history.append(row)
        log.info("round %d: %s", server_round, {k: v for k, v in row.items() if k != "refused_reasons"})
        return out

    train_config = ConfigRecord({"local-epochs": f.local_epochs})
    extra: dict[str, Any] = {}
    if f.secure_aggregation:
        from plait.fl.secagg import run_secagg
        final = run_secagg(grid, context, cfg, initial, evaluate_fn)
    elif f.strategy == "fedbuff":
        from plait.fl.fedbuff import FedBuff
        buff = FedBuff(buffer_size=f.buffer_size, concurrency=f.concurrency or per_round(cfg),
                       max_staleness=f.max_staleness, server_lr=f.server_lr, min_available_nodes=f.clients,
                       train_config=train_config, weight_key=weight_key(cfg), participation=participation)
        holder: dict[int, RoundStats] = {}
        stats_of = holder.get
        buff.on_step = holder.__setitem__  # the step's stats, before evaluate_fn records them
        out = buff.start(grid, initial, num_steps=f.rounds, evaluate_fn=evaluate_fn)
        final = out.arrays
        extra = {"max_staleness_seen": out.max_staleness_seen, "stale_refused": out.stale_refused}
    else:
        guard = UpdateGuard(build_strategy(cfg), min_replies=f.min_clients, drop_partial=f.drop_stragglers,
                            weight_key=weight_key(cfg), participation=participation)
        stats_of = guard.rounds.get
        result = guard.start(grid, initial, num_rounds=f.rounds, train_config=train_config,
                             evaluate_fn=evaluate_fn)
        final = result.arrays if len(result.arrays) else initial
    return FederatedResult(history, numpy_arrays(final), data.report(), f.strategy, extra=extra)


def build_server_app(cfg: Config, on_result: Callable[[FederatedResult], None] | None = None) -> ServerApp:
    """The ServerApp of a federated run of `cfg`; `on_result` receives its result."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, context, cfg)
        if on_result is not None:
            on_result(result)

    return app

