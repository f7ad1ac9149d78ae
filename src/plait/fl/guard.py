"""The server side of every client update, in front of Flower's strategy.

:class:`UpdateGuard` wraps any Flower Message-API strategy (FedAvg, FedProx, FedAdam, Krum, the
DP wrappers, ...) and, before that strategy aggregates a round, for each reply:

1. counts the bytes the client uploaded;
2. decodes a compressed update (plait.fl.compress) into full parameters;
3. refuses, and logs with the reason, a reply that carries an error, that does not fit the
   server's parameters (names, shapes, dtypes), that holds NaN/Inf, or that lacks a positive
   weight; and partial work when `drop_partial` is set (FedAvg as Li et al. ran it);
4. applies the minimum-clients rule: with fewer than `min_replies` acceptable updates (clients
   dropped out, or were refused) the round keeps the global model.

The wrapped strategy sees only well-formed replies and aggregates as it would on its own.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from plait.fl.compress import SCHEME, UpdateDecodeError, decode_update, is_compressed
from plait.fl.records import ARRAYS, METRICS, WEIGHT, payload_bytes, wire_bytes
from plait.fl.validation import check_update

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """What the guard saw in one round."""

    sent: int = 0  # train messages the strategy sent
    replies: int = 0
    accepted: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)  # (node id, why)
    partial: int = 0  # replies that did partial work (stragglers)
    upload_wire_bytes: int = 0  # as Flower serialises the ArrayRecords
    upload_payload_bytes: int = 0  # tensor elements × element size
    aggregated: bool = False


def screen(reply: Message, reference: ArrayRecord, stats: RoundStats, *, drop_partial: bool = False,
           weight_key: str = WEIGHT) -> Message | None:
    """The reply as the strategy should see it (decoded), or None when refused (logged)."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        stats.refused.append((node, f"client error: {reply.error.reason}"))
        return None
    content = reply.content
    arrays = content.array_records.get(ARRAYS)
    if arrays is not None:
        stats.upload_wire_bytes += wire_bytes(arrays)
        stats.upload_payload_bytes += payload_bytes(arrays)
    if is_compressed(content):
        try:
            decoded = decode_update(content, reference)
        except (UpdateDecodeError, ValueError, TypeError) as exc:
            stats.refused.append((node, f"compressed update refused: {exc}"))
            return None
        content[ARRAYS] = decoded
        del content[SCHEME]
    why = check_update(content, reference, weight_key)
    if why is not None:
        stats.refused.append((node, why))
        return None
    metrics = content.metric_records.get(METRICS, MetricRecord())
    if metrics.get("partial", 0):
        stats.partial += 1
        if drop_partial:
            stats.refused.append((node, "partial work (fl.drop_stragglers)"))
            return None
    return reply


def keep_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`arrays` in the reference's dtypes: some strategies (FedAdam, FedYogi) compute in float64,
    but the global model keeps the model's own dtypes, which clients send back."""
    if all(arrays[k].dtype == reference[k].dtype for k in reference.keys() if k in arrays):
        return arrays
    values = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
    return ArrayRecord({k: Array(np.ascontiguousarray(v.astype(np.dtype(reference[k].dtype))))
                        if k in reference else Array(v) for k, v in values.items()})


class UpdateGuard(Strategy):
    """Screens every reply (see the module docstring), then lets `inner` aggregate."""

    def __init__(self, inner: Strategy, *, min_replies: int = 1, drop_partial: bool = False,
                 weight_key: str = WEIGHT, participation: Counter | None = None):
        self.inner = inner
        self.participation = participation if participation is not None else Counter()  # node -> rounds
        self.min_replies = min_replies
        self.drop_partial = drop_partial
        self.weight_key = weight_key
        self.reference = ArrayRecord()
        self.rounds: dict[int, RoundStats] = {}

    def summary(self) -> None:
        log.info("update guard: min %d acceptable replies a round; drop partial work: %s",
                 self.min_replies, self.drop_partial)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.reference = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.participation.update(m.metadata.dst_node_id for m in messages)
        self.rounds[server_round] = RoundStats(sent=len(messages))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        accepted = []
        for reply in replies:
            stats.replies += 1
            ok = screen(reply, self.reference, stats, drop_partial=self.drop_partial,
                        weight_key=self.weight_key)
            if ok is not None:
                accepted.append(ok)
        stats.accepted = len(accepted)
        for node, why in stats.refused:
            log.warning("round %d: refused the update of node %d: %s", server_round, node, why)
        missing = stats.sent - stats.replies
        if missing > 0:
            log.warning("round %d: %d of %d clients did not reply (dropped out)", server_round,
                        missing, stats.sent)
        if len(accepted) < self.min_replies:
            log.warning("round %d: %d acceptable update(s), fewer than the minimum %d (fl.min_clients); "
                        "the global model is kept", server_round, len(accepted), self.min_replies)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        stats.aggregated = arrays is not None
        if arrays is not None:
            arrays = keep_dtypes(arrays, self.reference)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])
