"""Asynchronous buffered aggregation (FedBuff; Nguyen et al., 2022), which Flower lacks.

The server keeps `concurrency` clients training at all times. Each reply is an update
Δ = w_client − w_sent against the model version the client was sent; it waits in a buffer, weighted
by 1/√(1 + staleness) where staleness is the number of server steps taken since that version.
When `buffer_size` updates are in, the server steps w ← w + server_lr · mean(buffer) and the version
advances. An update whose staleness exceeds `max_staleness` is refused (logged); so is a reply the
guard refuses (plait.fl.guard.screen: errors, wrong shapes or dtypes, NaN/Inf). A client that
replied is sent the newest model at once, so fast clients never wait for slow ones.

It runs on any Flower Grid with push_messages/pull_messages: the in-process runner's (whose
clock advances to the next reply) or a SuperLink's (polled every `poll_s`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from plait.errors import ConfigError
from plait.fl.guard import RoundStats, screen
from plait.fl.records import ARRAYS, WEIGHT, numpy_arrays

log = logging.getLogger(__name__)


def staleness_weight(staleness: int) -> float:
    """FedBuff's down-weighting of an update computed on a model `staleness` steps old."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass
class FedBuffResult:
    arrays: ArrayRecord
    steps: dict[int, RoundStats] = field(default_factory=dict)  # per server step
    evaluations: dict[int, MetricRecord] = field(default_factory=dict)
    max_staleness_seen: int = 0
    stale_refused: int = 0


class FedBuff:
    """Buffered asynchronous aggregation with a staleness bound (see the module docstring)."""

    def __init__(self, *, buffer_size: int, concurrency: int, max_staleness: int, server_lr: float = 1.0,
                 min_available_nodes: int = 1, train_config: ConfigRecord | None = None,
                 weight_key: str = WEIGHT, poll_s: float = 0.1, participation: Counter | None = None):
        if buffer_size < 1 or concurrency < 1:
            raise ConfigError(f"fl.buffer_size={buffer_size} and fl.concurrency={concurrency} must be ≥ 1")
        if buffer_size > concurrency:
            raise ConfigError(f"fl.buffer_size={buffer_size} exceeds the {concurrency} clients training at "
                              "once (fl.concurrency): the buffer would never fill")
        if max_staleness < 0 or server_lr <= 0:
            raise ConfigError(f"fl.max_staleness={max_staleness} must be ≥ 0 and fl.server_lr={server_lr} > 0")
        self.buffer_size, self.concurrency = buffer_size, concurrency
        self.max_staleness, self.server_lr = max_staleness, server_lr
        self.min_available_nodes = min_available_nodes
        self.train_config = train_config or ConfigRecord()
        self.weight_key = weight_key
        self.poll_s = poll_s
        self.participation = participation if participation is not None else Counter()  # node -> tasks
        self.on_step: Callable[[int, RoundStats], None] | None = None  # called as each step is taken

    def _message(self, node: int, arrays: ArrayRecord, version: int) -> Message:
        config = ConfigRecord(dict(self.train_config))
        config["server-round"] = version
        return Message(RecordDict({ARRAYS: arrays, "config": config}), dst_node_id=node,
                       message_type=MessageType.TRAIN, group_id=str(version))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_steps: int, timeout: float = 3600.0,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> FedBuffResult:
        """Run until `num_steps` server steps are taken (or `timeout` seconds pass without one)."""
        while len(nodes := sorted(grid.get_node_ids())) < max(self.min_available_nodes, self.concurrency):
            log.info("fedbuff: waiting for nodes: %d connected, %d needed", len(nodes), self.concurrency)
            time.sleep(1.0)
        current = numpy_arrays(initial_arrays)
        arrays = initial_arrays
        result = FedBuffResult(arrays)
        if evaluate_fn is not None and (m := evaluate_fn(0, arrays)) is not None:
            result.evaluations[0] = m
        version = 0
        sent: dict[int, dict[str, np.ndarray]] = {0: current}  # versions still in flight
        in_flight: dict[str, tuple[int, int]] = {}  # message id -> (node, version)

        def dispatch(node_ids: list[int]) -> None:
            msgs = [self._message(n, arrays, version) for n in node_ids]
            for mid, n in zip(grid.push_messages(msgs), node_ids):
                in_flight[mid] = (n, version)
            self.participation.update(node_ids)

        dispatch(random.sample(nodes, self.concurrency))
        buffer: list[tuple[float, dict[str, np.ndarray]]] = []
        stats = RoundStats()
        last_progress = time.monotonic()
        while version < num_steps:
            replies = list(grid.pull_messages(list(in_flight)))
            if not replies:
                if not in_flight or time.monotonic() - last_progress > timeout:
                    log.warning("fedbuff: no replies for %.0f s (or no client left); stopping at step %d",
                                timeout, version)
                    break
                time.sleep(self.poll_s)
                continue
            redispatch = []
            for reply in replies:
                node, base = in_flight.pop(reply.metadata.reply_to_message_id)
                redispatch.append(node)
                stats.sent += 1
                stats.replies += 1
                staleness = version - base
                result.max_staleness_seen = max(result.max_staleness_seen, staleness)
                reference = ArrayRecord({k: Array(v) for k, v in sent[base].items()})
                ok = screen(reply, reference, stats, weight_key=self.weight_key)
                if ok is None:
                    log.warning("fedbuff step %d: refused the update of node %d: %s", version, node,
                                stats.refused[-1][1])
                    continue
                if staleness > self.max_staleness:
                    stats.refused.append((node, f"staleness {staleness} > fl.max_staleness={self.max_staleness}"))
                    result.stale_refused += 1
                    log.warning("fedbuff step %d: refused the update of node %d: %s", version, node,
                                stats.refused[-1][1])
                    continue
                local = numpy_arrays(ok.content.array_records[ARRAYS])
                delta = {k: local[k] - sent[base][k] for k in current}
                buffer.append((staleness_weight(staleness), delta))
                stats.accepted += 1
                if len(buffer) >= self.buffer_size:
                    current = {k: (v + self.server_lr * sum(w * d[k] for w, d in buffer) / len(buffer)).astype(v.dtype)
                               for k, v in current.items()}
                    buffer = []
                    version += 1
                    arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
                    sent[version] = current
                    stats.aggregated = True
                    result.steps[version] = stats
                    if self.on_step is not None:
                        self.on_step(version, stats)
                    stats = RoundStats()
                    last_progress = time.monotonic()
                    if evaluate_fn is not None and (m := evaluate_fn(version, arrays)) is not None:
                        result.evaluations[version] = m
                    if version >= num_steps:
                        break
            if version < num_steps:
                dispatch(redispatch)
            live = {v for _, v in in_flight.values()} | {version}
            for v in [v for v in sent if v not in live]:
                del sent[v]
        result.arrays = arrays
        return result
