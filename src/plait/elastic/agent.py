"""One elastic node: torch's elastic agent over this machine's workers, with plait's rules.

    python -m plait.elastic.agent CONFIG.toml --nnodes 2:4 --nproc-per-node 8 \\
        --rdzv-endpoint HOST:PORT --rdzv-id JOB [--set section.key=value ...]

is torchrun's job for plait (one per node; the node at HOST hosts the rendezvous store), and what
`plait train --elastic MIN:MAX` starts once per local "node". Compared with torchrun's agent it:

- gives every rendezvous round a fresh store namespace, and points the workers at the rendezvous
  store (which outlives any one node): a restarted group never reads keys of an earlier round,
  and a departed node's store cannot be left behind for the others;
- lets a node whose worker was killed by a signal (SIGKILL: the OOM killer, a lost machine)
  leave, instead of restarting at the same size: the others re-form without it (min_nodes
  allowing), and new nodes join at the next round;
- never closes the rendezvous when a node gives up, so the job goes on without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _agent_class():
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import (
        LocalElasticAgent,
    )

    from plait.elastic.membership import NAMESPACE_ENV
    from plait.elastic.preemption import PREEMPTED_EXIT_CODE

    class PlaitAgent(LocalElasticAgent):
        """LocalElasticAgent with per-round store namespaces, leave-on-signal, and no restart
        after a preemption."""

        left = False
        preempted = False

        def _rendezvous(self, worker_group) -> None:
            super()._rendezvous(worker_group)
            # The round's store is prefixed with the round: the first agent's id wins for all.
            ns = worker_group.store.compare_set("plait/namespace", "", uuid.uuid4().hex)
            ns = ns.decode() if isinstance(ns, bytes) else str(ns)
            os.environ[NAMESPACE_ENV] = f"plait/{ns}"  # the workers inherit it
            log.info("rendezvous: node %d of %d, store namespace %s", worker_group.group_rank,
                     worker_group.group_world_size, ns)

        def _stop_workers(self, worker_group) -> None:
            # A restart resumes from the newest checkpoint (or snapshot): the old workers have
            # nothing left to do, and a SIGTERM'd worker that waits on a departed peer would
            # hold the new round back for torch's 30 s grace.
            self._shutdown(death_sig=signal.SIGKILL, timeout=5)

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.state == WorkerState.FAILED and any(
                    f.exitcode == PREEMPTED_EXIT_CODE for f in result.failures.values()):
                # The workers checkpointed on a preemption signal: the machines are going away,
                # so the job stops here instead of restarting (the scheduler requeues it).
                log.warning("the workers were preempted and checkpointed: this node stops")
                self._remaining_restarts = 0
                self.preempted = True
            elif result.state == WorkerState.FAILED and any(
                    f.exitcode is not None and f.exitcode < 0 for f in result.failures.values()):
                log.warning("a worker of this node was killed by a signal: the node leaves the job")
                self._remaining_restarts = 0
                self.left = True
            return result

    return PlaitAgent


def _leave(handler) -> None:
    """Take this node out of the rendezvous now, so the others re-form without waiting for its
    keep-alive to expire. torch has no public call for it (shutdown() would close the rendezvous
    for everyone); where its internals differ, the keep-alive expiry does the same, later."""
    try:
        import time

        from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

        handler._stop_heartbeats()
        handler._op_executor.run(dr._RendezvousExitOp(), time.monotonic() + 10)
    except Exception as exc:  # noqa: BLE001 - best effort, see above
        log.info("could not leave the rendezvous explicitly (%s); its keep-alive will expire", exc)


def run_node(cfg_dict: dict[str, Any], endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
             nproc_per_node: int = 1, max_restarts: int = 3, host_store: bool = True,
             last_call_s: int = 1, join_timeout_s: int = 60, keep_alive_s: int = 1,
             log_dir: str | None = None, before_join: Callable[[], None] | None = None,
             start_method: str = "spawn") -> dict[str, Any]:
    """Run one elastic node until the job ends; returns {"ok", "left", "results", "failures"}.

    `host_store` False: the store at `endpoint` is hosted elsewhere (plait's local launcher);
    True: this node hosts it when `endpoint` names this machine, as torchrun decides.
    `before_join` runs once everything is ready, just before the node joins the rendezvous.
    `start_method` "spawn" (torch's default) starts each round's workers afresh; "fork" starts
    them in milliseconds from this process, which has imported torch and plait already, but the
    workers then inherit the agent's store connections and locks: in about 1 of 20 restarts
    under test an agent stopped answering the rendezvous, so it is not the default.
    """
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    from plait.launch import exit_when_preempted
    from plait.train.run import train_process

    host, _, port = endpoint.rpartition(":")
    configs = {"join_timeout": join_timeout_s, "last_call_timeout": last_call_s,
               "keep_alive_interval": keep_alive_s, "keep_alive_max_attempt": 3, "close_timeout": 10}
    if not host_store:
        configs["is_host"] = False
    params = RendezvousParameters(backend="c10d", endpoint=endpoint, run_id=run_id,
                                  min_nodes=min_nodes, max_nodes=max_nodes, **configs)
    handler = rdzv_registry.get_rendezvous_handler(params)
    # Workers use the rendezvous store (namespaced per round) for their process groups.
    spec = WorkerSpec(role="trainer", local_world_size=nproc_per_node, entrypoint=exit_when_preempted,
                      args=(train_process, cfg_dict, False), rdzv_handler=handler, max_restarts=max_restarts,
                      monitor_interval=0.1, master_addr=host, master_port=int(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # No store shared from the first round's rank-0 agent: that agent may leave, and torch 2.13
    # then leaves a node joining later waiting for a MASTER_ADDR nobody publishes. Each round's
    # rank 0 publishes its own instead; workers use the rendezvous store in any case.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    agent = _agent_class()(spec=spec, logs_specs=DefaultLogsSpecs(log_dir=log_dir),
                           start_method=start_method, exit_barrier_timeout=60)
    if before_join is not None:
        before_join()
    result = agent.run()
    failures = {rank: {"exitcode": f.exitcode, "message": str(f.message)}
                for rank, f in result.failures.items()}
    ok = not result.is_failed()
    if ok:
        handler.shutdown()  # the job is done: close the rendezvous for good
    else:
        _leave(handler)
    return {"ok": ok, "left": agent.left, "preempted": agent.preempted,
            "results": result.return_values if ok else {}, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plait.elastic.agent",
                                     description="one elastic plait node (torchrun's role)")
    parser.add_argument("config", help="TOML config, or a JSON config tree (.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--nnodes", required=True, help="MIN:MAX nodes (or N)")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of the rendezvous store")
    parser.add_argument("--rdzv-id", required=True, help="the job's id, the same on every node")
    parser.add_argument("--store-hosted-elsewhere", action="store_true",
                        help="never host the store here (plait's local launcher hosts it)")
    parser.add_argument("--result", default=None, help="write this node's outcome as JSON here")
    parser.add_argument("--standby", default=None, metavar="FILE",
                        help="a warm spare: start up now (imports, config), join the job once FILE "
                             "exists; FILE.ready appears when the node is waiting")
    args = parser.parse_args(argv)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is this node?
    logging.basicConfig(level=os.environ.get("PLAIT_AGENT_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from plait.config import Config, load_config

    if args.config.endswith(".json"):
        cfg = Config.from_dict(json.loads(Path(args.config).read_text()))
    else:
        cfg = load_config(args.config, args.set)
    from plait.elastic.membership import check_elastic

    lo, _, hi = args.nnodes.partition(":")
    e = cfg.elastic
    e.min_nodes, e.max_nodes, e.nproc_per_node = int(lo), int(hi or lo), args.nproc_per_node
    check_elastic(cfg)
    standby = None
    if args.standby:
        def standby() -> None:
            import time

            Path(args.standby + ".ready").touch()
            while not Path(args.standby).exists():
                time.sleep(0.02)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from plait.elastic.preemption import PREEMPTED_EXIT_CODE

    try:
        out = run_node(cfg.to_dict(), args.rdzv_endpoint, args.rdzv_id, e.min_nodes, e.max_nodes,
                       args.nproc_per_node, e.max_restarts, not args.store_hosted_elsewhere,
                       e.rdzv_last_call_s, e.rdzv_join_timeout_s, e.keep_alive_s, before_join=standby)
    except SignalException as exc:
        # torch's agent passed the signal on to this node's workers (they checkpoint, see
        # plait.elastic.preemption) and stopped them; torchrun would exit 1 here, which a
        # scheduler cannot tell from a crash.
        log.warning("stopped by %s: exiting with code %d so that the job is requeued",
                    signal.Signals(exc.sigval).name, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    if args.result:
        tmp = Path(args.result + ".tmp")
        tmp.write_text(json.dumps(out, default=str))
        os.replace(tmp, args.result)
    if out["preempted"]:
        return PREEMPTED_EXIT_CODE
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
