"""Sharded checkpoints on torch.distributed.checkpoint: each rank writes only what it holds.

No rank gathers the model: every rank hands DCP its own pieces (:mod:`plait.parallel.sharded_state`
says where each lies in the plain model's tensors), DCP writes one file per rank plus a global
`.metadata`, and a later run under any other dp/tp/pp/ZeRO layout reads the overlaps it needs.
Around DCP the folder is a plait checkpoint like the gathered ones: written under a temporary
name, a manifest of every file's size and SHA-256 (each rank hashes its own files), renamed into
place by rank 0 only when complete, so "newest valid" fallback and damage checks apply unchanged.

With `async_save` the step waits only for a CPU copy of this rank's pieces; a background thread
writes it, on a Gloo group of its own so its collectives never interleave with training's. One
save is in flight at a time: the next one (and the end of training) waits for it.
"""

from __future__ import annotations

import copy
import os
import logging
import shutil
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from plait.errors import CheckpointError
from plait.parallel.base import ParallelModel
from plait.parallel.sharded_state import (BoxLoadPlanner, Boxes, BoxSavePlanner, finish_load, local_state,
                                          prepare_load)
from plait.train.checkpoint import (SHARDED_FORMAT, file_entry, prune, publish, verify_checkpoint,
                                    write_manifest)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # step, sampler, RNG per rank, config (rank 0)


def comm_file(rank: int) -> str:
    """Per-rank gradient-compression state (PowerSGD, top-k): only the same layout reuses it."""
    return f"comm_{rank:05d}.pt"


def stage(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of a rank's DCP state (views become compact tensors), safe to write later."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Boxes):
            out[k] = Boxes(v.shape, {off: t.detach().to("cpu", copy=True) for off, t in v.parts.items()})
        elif torch.is_tensor(v):
            out[k] = v.detach().to("cpu", copy=True)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _clone(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _save_file(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class ShardedCheckpointer:
    """Writes the sharded checkpoints of one run (every rank constructs one, collectively)."""

    def __init__(self, root: str | Path, world_size: int, keep: int | None = None,
                 async_save: bool = True):
        self.root = Path(root)
        self.keep = keep
        self.distributed = dist.is_initialized() and world_size > 1
        self.async_save = async_save
        # A background save runs DCP's collectives on a Gloo group of its own (as dcp.async_save
        # advises), so they never interleave with the training step's on the default group.
        self.group = dist.new_group(backend="gloo") if self.distributed and async_save else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="plait-ckpt") if async_save else None
        self._pending: Future | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.distributed else 0

    def save(self, step: int, state: dict[str, Any], main_state: dict[str, Any] | None,
             rank_state: Any = None) -> Path:
        """Write checkpoint `step` of this rank's `state` (from :func:`local_state`); rank 0 adds
        `main_state` (the trainer's), every rank its `rank_state` (or None). Collective.

        Asynchronous: returns once the pieces are copied to the CPU; the folder appears when the
        background write completes (:meth:`wait`). Synchronous: returns when it is published.
        """
        self.wait()
        final = self.root / f"step_{step:08d}"
        if self._pool is None:
            self._write(step, state, main_state, rank_state)
            return final
        staged = stage(state)
        main_state, rank_state = _clone(main_state), _clone(rank_state)
        self._pending = self._pool.submit(self._write, step, staged, main_state, rank_state)
        return final

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the save in flight and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _write(self, step: int, state: dict[str, Any], main_state: dict[str, Any] | None,
               rank_state: Any) -> None:
        rank, group = self.rank, self.group
        holder: list[Any] = [None]
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            holder[0] = tempfile.mkdtemp(dir=self.root, prefix=f".tmp-step_{step:08d}-")
        if self.distributed:
            dist.broadcast_object_list(holder, src=0, group=group)
        tmp = Path(holder[0])
        files: dict[str, Any] = {}
        error = None
        try:
            with warnings.catch_warnings():  # one process: DCP warns that it saves without peers
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=True),
                         planner=BoxSavePlanner(), process_group=group, no_dist=not self.distributed)
            if rank == 0:
                _save_file(tmp / STATE_FILE, main_state)
            if rank_state is not None:
                _save_file(tmp / comm_file(rank), rank_state)
            mine = (f"__{rank}_", comm_file(rank)) + ((".metadata", STATE_FILE) if rank == 0 else ())
            files = {p.name: file_entry(p) for p in tmp.iterdir() if p.name.startswith(mine)}
        except Exception as exc:  # every rank learns of it below; none waits forever
            error = f"rank {rank}: {exc}"
        every: list[Any] = [None] * dist.get_world_size(group) if self.distributed else [None]
        if self.distributed:
            dist.all_gather_object(every, (files, error), group=group)
        else:
            every = [(files, error)]
        errors = [e for _, e in every if e]
        if rank == 0:
            if errors:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    write_manifest(tmp, step, {n: e for f, _ in every for n, e in f.items()}, SHARDED_FORMAT)
                    publish(tmp, self.root, step)
                    prune(self.root, step, self.keep)
                except Exception as exc:
                    shutil.rmtree(tmp, ignore_errors=True)
                    errors.append(f"rank 0: {exc}")
        if self.distributed:
            decision = [errors]
            dist.broadcast_object_list(decision, src=0, group=group)
            errors = decision[0]
        if errors:
            raise CheckpointError(f"sharded checkpoint of step {step} under {str(self.root)!r} was not "
                                  f"written: {'; '.join(errors)}")


def load_sharded(path: str | Path, model: ParallelModel, optimizer: torch.optim.Optimizer,
                 rank: int) -> dict[str, Any]:
    """Load this rank's share of a sharded checkpoint (saved under any layout) into `model` and
    `optimizer`; returns {"state": the trainer state, "comm": this rank's compression state or
    None}. Each rank reads on its own (no collective)."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        reader = dcp.FileSystemReader(str(path))
        saved = set(reader.read_metadata().state_dict_metadata)
        trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        comm = path / comm_file(rank)
        comm_state = torch.load(comm, map_location="cpu", weights_only=True) if comm.is_file() else None
    except Exception as exc:  # checksums passed, so this is a foreign or incompatible file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc})") from None
    load_local_state(model, optimizer, reader, saved, no_dist=True, what=f"checkpoint {str(path)!r}")
    return {"state": trainer_state, "comm": comm_state}


def load_local_state(model: ParallelModel, optimizer: torch.optim.Optimizer, reader: Any,
                     saved: set[str], no_dist: bool, what: str) -> None:
    """Fill this rank's pieces of model and optimizer state from a DCP `reader` with keys `saved`."""
    prepare_load(model, optimizer, saved.__contains__)
    state = local_state(model, optimizer)
    state = {k: v for k, v in state.items() if k.startswith("model.") or k in saved}
    try:
        with warnings.catch_warnings():  # each rank reads on its own, which DCP warns about
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=BoxLoadPlanner(), no_dist=no_dist)
    except Exception as exc:
        raise CheckpointError(f"{what} does not fit this model/optimizer (check [model]): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finish_load(model, optimizer, state.get("optim.param_groups"))
