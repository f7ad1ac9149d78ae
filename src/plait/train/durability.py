"""What keeps a run's progress for the trainer: sharded saves, per-step snapshots, preemption.

The trainer calls four seams: :meth:`Durability.save` / :meth:`Durability.load` for sharded
checkpoints ([checkpoint] format = "sharded"), :meth:`Durability.newer_snapshot` when resuming
"auto", and :meth:`Durability.after_step` / :meth:`Durability.finish` around training, which
take the in-memory snapshot ([checkpoint] snapshot) and notice preemption signals
([checkpoint] preemption).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from plait.config import Config
from plait.elastic.preemption import Preemption
from plait.elastic.snapshot import Snapshot, Snapshotter, clear_snapshots, default_snapshot_dir, find_snapshot
from plait.mesh import ParallelMesh
from plait.parallel.base import ParallelModel
from plait.parallel.sharded_state import local_state, param_names
from plait.train.checkpoint import SHARDED_FORMAT, checkpoint_format, checkpoint_step
from plait.train.sharded_checkpoint import ShardedCheckpointer, load_local_state, load_sharded

log = logging.getLogger(__name__)


class Durability:
    """One run's sharded checkpointer, snapshotter and preemption handler (each optional)."""

    def __init__(self, cfg: Config, mesh: ParallelMesh, model: ParallelModel, optimizer: torch.optim.Optimizer):
        c = cfg.checkpoint
        self.cfg, self.mesh, self.model, self.optimizer = cfg, mesh, model, optimizer
        self.distributed = dist.is_initialized() and mesh.world_size > 1
        self.sharded = c.format == "sharded"
        root = Path(cfg.train.out_dir) / "checkpoints"
        self.checkpointer = (ShardedCheckpointer(root, mesh.world_size, keep=c.keep, async_save=c.async_save)
                             if self.sharded else None)
        self.model_keys = self._model_keys() if self.sharded else None
        self.snapshot_dir = Path(c.snapshot_dir) if c.snapshot_dir else default_snapshot_dir(cfg.train.out_dir)
        self.snapshots: Snapshotter | None = None
        self.preemption = Preemption(c.preempt_deadline_s) if c.preemption else None
        self._installed = False

    @property
    def preempted(self) -> str | None:
        """The signal that stopped training (after every rank agreed), or None."""
        return getattr(self, "_preempted", None)

    # --- sharded checkpoints ----------------------------------------------------------------

    def _model_keys(self) -> dict[str, str]:
        """Every key of the plain model's state_dict -> the tensor it is stored under (tied
        weights are stored once), gathered over pipeline stages (collective)."""
        names = param_names(self.model)
        mine = {n: names[id(p)] for n, p in self.model.module.named_parameters(remove_duplicate=False)}
        mine.update({n: n for n, _ in self.model.module.named_buffers()})
        every = [None] * self.mesh.world_size
        if self.distributed:
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        merged: dict[str, str] = {}
        for m in every:
            merged.update(m)
        order = getattr(self.model, "_full_keys", None) or list(merged)
        return {k: merged[k] for k in order if k in merged}

    def handles(self, source: Any) -> bool:
        """Whether :meth:`load` reads `source` (a sharded checkpoint folder or a snapshot)."""
        return isinstance(source, Snapshot) or checkpoint_format(source) == SHARDED_FORMAT

    def save(self, step: int, state: dict[str, Any] | None) -> Path:
        """Write a sharded checkpoint of `step` (collective); `state` is the trainer state (rank 0)."""
        if state is not None:
            state = {**state, "model_keys": self.model_keys, "world": self.mesh.world_size}
        return self.checkpointer.save(step, local_state(self.model, self.optimizer), state,
                                      self.model.comm_state())

    def load(self, source: Any) -> dict[str, Any]:
        """Fill model and optimizer from a sharded checkpoint or a snapshot, saved under any
        layout; returns {"state": trainer state, "comm": per-rank list or None}."""
        if isinstance(source, Snapshot):
            load_local_state(self.model, self.optimizer, source.reader(), _keys(source), no_dist=True,
                             what=f"snapshot {source}")
            parts = {"state": source.trainer_state(), "comm": None}
        else:
            parts = load_sharded(source, self.model, self.optimizer, self.mesh.rank)
            if parts["comm"] is not None and parts["state"].get("world") == self.mesh.world_size:
                comm: list[Any] = [None] * self.mesh.world_size
                comm[self.mesh.rank] = parts["comm"]
                parts["comm"] = comm
            else:
                parts["comm"] = None
        self.model.steps_done = int(parts["state"]["step"])
        return parts

    # --- snapshots ----------------------------------------------------------------------------

    def newer_snapshot(self, disk: Path | None) -> Snapshot | None:
        """The in-memory snapshot to resume from, when one is newer than checkpoint `disk` and
        every rank can read it (collective); else None."""
        if not self.cfg.checkpoint.snapshot:
            return None
        snap = find_snapshot(self.snapshot_dir)
        step = [snap.step if snap is not None else -1]
        if self.distributed:  # rank 0 decides which step; every rank must see it complete
            dist.broadcast_object_list(step, src=0)
        disk_step = checkpoint_step(disk) if disk is not None else 0
        usable = snap is not None and snap.step == step[0] and step[0] > disk_step
        if self.distributed:
            flag = torch.tensor([1.0 if usable else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            usable = flag.item() > 0
        if usable:
            log.info("resuming from the in-memory snapshot of step %d (newest checkpoint on disk: %s)",
                     snap.step, disk)
            return snap
        return None

    def begin(self) -> None:
        """Before training: install the preemption handler; start snapshots afresh (collective
        the first time: the node's old snapshot files go once every rank has loaded)."""
        if self.preemption is not None and not self._installed:
            self._installed = self.preemption.install()
        if self.cfg.checkpoint.snapshot and self.snapshots is None:
            self.mesh.barrier()
            if int(os.environ.get("LOCAL_RANK", self.mesh.rank if not self.distributed else 0)) == 0:
                clear_snapshots(self.snapshot_dir)
            self.mesh.barrier()
            self.snapshots = Snapshotter(self.snapshot_dir, self.mesh.rank, self.mesh.world_size)

    def after_step(self, step: int, trainer_state: Callable[[], dict[str, Any]]) -> bool:
        """Snapshot this step (with this rank's `trainer_state()`); True when training must stop
        for preemption (collective)."""
        if self.snapshots is not None:
            self.snapshots.capture(step, local_state(self.model, self.optimizer), trainer_state())
        if self.preemption is not None and self._installed:
            if self.preemption.agreed(self.mesh.device, self.mesh.world_size):
                self._preempted = self.preemption.signal_name or "signal on another rank"
                log.warning("preempted (%s) after step %d: checkpointing", self._preempted, step)
                return True
        return False

    def before_update(self) -> None:
        """Before the optimizer changes the state: the snapshot copy in flight must be done."""
        if self.snapshots is not None:
            self.snapshots.wait()

    def finish(self, completed: bool) -> None:
        """After training: wait for the checkpoint in flight, stop the snapshots (their files go
        when the run completed), give the signals back."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            if self.snapshots is not None:
                self.snapshots.close(remove=completed)
                self.snapshots = None
            if self.preemption is not None:
                self.preemption.finished()
                self.preemption.uninstall()
                self._installed = False

    def close(self) -> None:
        """Stop the background writer (waits for the save in flight)."""
        if self.checkpointer is not None:
            self.checkpointer.close()


def _keys(snapshot: Snapshot) -> set[str]:
    return {e["key"] for ix in snapshot.indices for e in ix["entries"]} | {
        k for ix in snapshot.indices for k in ix["objects"]}

