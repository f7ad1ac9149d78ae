"""The in-process runner: the same ServerApp and ClientApp, every client in this process.

:class:`LocalGrid` is a Flower :class:`~flwr.serverapp.Grid` whose nodes are the ClientApp run
in-process, one per partition, each with its own persistent `Context` (so error feedback and
SecAgg+ keys live where they would on a SuperNode). Flower's strategies drive it unchanged:
`configure_train` → `send_and_receive` → `aggregate_train`. Each instruction's content is copied
before a client sees it, as a transport would. A ClientApp exception becomes an error reply, as
Flower's runtimes report it.

Clients run one after another, so the grid keeps a clock of its own: a reply is ready
`local-steps × slowdown` time units after its instruction (a slow client's slowdown is
`fl.slowdown`, the others' 1), `pull_messages` returns the replies ready by the clock and, when
none is, moves the clock to the next one. Synchronous rounds so take as long as their slowest
client and asynchronous aggregation (FedBuff) sees replies in the order real clients of those
speeds would send them. A client that drops out mid-round (`fl.dropout`, or a `drop` rule)
never replies.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import uuid4

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from plait.config import Config

log = logging.getLogger(__name__)

FIRST_NODE = 100  # node ids are FIRST_NODE + partition id (Flower's SuperLink is node 1)


def slow_clients(clients: int, share: float, seed: int) -> set[int]:
    """Partition ids of the round(share × clients) slow clients, drawn with the run's seed."""
    rng = np.random.default_rng([seed, 0x510])
    return {int(i) for i in rng.choice(clients, size=int(round(share * clients)), replace=False)}


def dropout_rule(share: float, seed: int) -> Callable[[Message, int], bool] | None:
    """Each round, each client drops out with probability `share` (decided once per round and
    client). Under SecAgg+ it drops after the keys are shared, when its masked update is due."""
    if share <= 0:
        return None

    def drop(msg: Message, pid: int) -> bool:
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
            return False
        rnd = int(msg.metadata.group_id or 0)
        return bool(np.random.default_rng([seed, rnd, pid, 0xD0]).random() < share)

    return drop


@dataclass
class _Pending:
    reply: Message | None  # None: the node dropped out
    ready_at: float


class LocalGrid(Grid):
    """A Grid over in-process ClientApps with a clock (see the module docstring)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, *, run_id: int = 1,
                 run_config: dict | None = None, slowdown: dict[int, float] | None = None,
                 drop: Callable[[Message, int], bool] | None = None):
        self.client_app = client_app
        self.node_ids = [FIRST_NODE + pid for pid in range(num_nodes)]
        self.contexts = {nid: Context(run_id=run_id, node_id=nid,
                                      node_config={"partition-id": nid - FIRST_NODE, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config=dict(run_config or {}))
                         for nid in self.node_ids}
        self.slowdown = slowdown or {}
        self.drop = drop
        self.now = 0.0
        self.dropped: list[tuple[int, str]] = []  # (node, group id) of replies that never came
        self.client_runs = 0
        self._pending: dict[str, _Pending] = {}
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)

    # --- Grid ------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"{next(self._ids)}-{uuid4().hex[:8]}"
            meta = msg.metadata.__dict__
            meta["_message_id"], meta["_run_id"], meta["_src_node_id"] = mid, self._run.run_id, SUPERLINK_NODE_ID
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise ValueError(f"message for unknown node {node}; nodes: {self.node_ids}")
            self._pending[mid] = self._execute(msg, node)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = [m for m in message_ids if m in self._pending and self._pending[m].reply is not None]
        if not wanted:
            return []
        if all(self._pending[m].ready_at > self.now for m in wanted):
            self.now = min(self._pending[m].ready_at for m in wanted)  # wait for the next reply
        out = [self._pending.pop(m).reply for m in wanted if self._pending[m].ready_at <= self.now]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        live = [m for m in ids if self._pending[m].reply is not None]
        for m in ids:
            if self._pending[m].reply is None:
                del self._pending[m]
        if live:
            self.now = max(self.now, max(self._pending[m].ready_at for m in live))
        return [self._pending.pop(m).reply for m in live]

    # --- clients ----------------------------------------------------------------------------

    def _execute(self, msg: Message, node: int) -> _Pending:
        pid = node - FIRST_NODE
        delivered = Message(copy.deepcopy(msg.content), metadata=copy.copy(msg.metadata))
        if self.drop is not None and self.drop(delivered, pid):
            self.dropped.append((node, msg.metadata.group_id))
            log.info("node %d dropped out (round %s)", node, msg.metadata.group_id)
            return _Pending(None, self.now)
        self.client_runs += 1
        try:
            reply = self.client_app(delivered, self.contexts[node])
        except Exception as exc:  # reported to the server as Flower's runtimes do, never raised
            log.warning("node %d: the ClientApp raised %s", node, traceback.format_exception_only(exc)[-1].strip())
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        steps = 0.0
        if reply.has_content():
            for record in reply.content.metric_records.values():
                steps = float(record.get("local-steps", 0.0))
        return _Pending(reply, self.now + steps * self.slowdown.get(pid, 1.0))


@contextlib.contextmanager
def task_identity(run_id: int):
    """This process acts as the SuperLink's ServerApp task of run `run_id` (Flower stamps the
    instructions a strategy creates with it), as Flower's own runtimes set it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def server_context(run_id: int = 1, run_config: dict | None = None) -> Context:
    return Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                   run_config=dict(run_config or {}))


def local_grid(cfg: Config, client_app: ClientApp,
               drop: Callable[[Message, int], bool] | None = None) -> LocalGrid:
    """The grid for `cfg`: its clients, its slow clients and its dropout rule."""
    f = cfg.fl
    slow = {pid: f.slowdown for pid in slow_clients(f.clients, f.slow_clients, f.seed)}
    return LocalGrid(client_app, f.clients, slowdown=slow,
                     drop=drop if drop is not None else dropout_rule(f.dropout, f.seed))


def run_local(cfg: Config, drop: Callable[[Message, int], bool] | None = None,
              client_app: ClientApp | None = None):
    """Run the federated job of `cfg` in this process (with `client_app` instead of the config's
    own, if given); returns its :class:`~plait.fl.server.FederatedResult`."""
    from plait.fl.client import build_client_app
    from plait.fl.server import build_server_app

    results: list = []
    grid = local_grid(cfg, client_app or build_client_app(cfg), drop)
    with task_identity(grid.run.run_id):
        build_server_app(cfg, on_result=results.append)(grid, server_context(grid.run.run_id))
    result = results[0]
    result.dropped = len(grid.dropped)
    return result
