"""In-memory snapshots: the latest training state in node-local shared memory, every step.

A disk checkpoint every N steps loses up to N steps on a crash; a snapshot loses at most one.
After each optimizer step every rank copies its own pieces of the model and optimizer state
(the same pieces a sharded checkpoint writes, :mod:`plait.parallel.sharded_state`) into a file
in shared memory (`/dev/shm`) and publishes a small index for it. A background thread does both
while the next step's forward and backward run (they only read the state, as in CheckFreq);
the next optimizer step waits for it. A
restarted run on the same node(s) finds the newest step for which every rank of the old run has
a complete snapshot and, when it is newer than the newest valid disk checkpoint, loads it
through torch.distributed.checkpoint, under any layout, exactly as it loads a sharded checkpoint.

Two slots per rank (step parity) keep the previous snapshot intact while the next is written:
a slot's index is removed before its data is overwritten and written back only once the copy
is complete, so an index on disk always describes complete data.

Files, per rank r: `rank_<r>.slot<k>.bin` (tensor bytes) and `rank_<r>.slot<k>.pt` (index:
step, world size, where each piece lies, the trainer state of that rank).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future as TorchFuture

from plait.parallel.sharded_state import Boxes

log = logging.getLogger(__name__)

INDEX = re.compile(r"^rank_(\d{5})\.slot([01])\.pt$")
ALIGN = 64  # bytes: every piece starts aligned for any dtype


def default_snapshot_dir(out_dir: str | Path) -> Path:
    """Node-local shared memory (`/dev/shm`, else the temp folder), one folder per run folder."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    tag = hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return base / f"plait-snapshot-{tag}"


def _pieces(state: dict[str, Any]) -> list[tuple[str, tuple[int, ...], torch.Size, torch.Tensor]]:
    """(key, offsets, global shape, tensor) of every tensor piece, in a fixed order."""
    out = []
    for key, v in state.items():
        if isinstance(v, Boxes):
            out.extend((key, off, v.shape, t) for off, t in v.parts.items())
        elif torch.is_tensor(v):
            out.append((key, (0,) * v.dim(), v.shape, v))
    return out


@dataclass
class _Layout:
    signature: tuple
    entries: list[dict[str, Any]]  # key, offsets, size (global), sizes, dtype, byte offset
    nbytes: int


class Snapshotter:
    """Writes this rank's per-step snapshots into `directory` (one per node, shared memory)."""

    def __init__(self, directory: str | Path, rank: int, world_size: int):
        self.dir = Path(directory)
        self.rank, self.world = rank, world_size
        self._layout: _Layout | None = None
        self._views: list[list[torch.Tensor]] = [[], []]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="plait-snapshot")
        self._pending: Future | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, slot: int, suffix: str) -> Path:
        return self.dir / f"rank_{self.rank:05d}.slot{slot}.{suffix}"

    def _plan(self, pieces: list) -> _Layout:
        signature = tuple((k, off, tuple(t.shape), t.dtype) for k, off, _, t in pieces)
        if self._layout is not None and self._layout.signature == signature:
            return self._layout
        entries, at = [], 0
        for key, off, size, t in pieces:
            entries.append({"key": key, "offsets": tuple(off), "size": tuple(size), "sizes": tuple(t.shape),
                            "dtype": t.dtype, "byte_offset": at})
            at += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self._layout = _Layout(signature, entries, max(at, ALIGN))
        for slot in (0, 1):  # shared-memory files, mapped once
            self._path(slot, "pt").unlink(missing_ok=True)
            storage = torch.UntypedStorage.from_file(str(self._path(slot, "bin")), shared=True,
                                                     nbytes=self._layout.nbytes)
            self._views[slot] = [_view(storage, e) for e in entries]
        return self._layout

    def capture(self, step: int, state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Copy this rank's `state` (from :func:`~plait.parallel.sharded_state.local_state`) into
        shared memory as the snapshot of `step`, in the background: call :meth:`wait` before the
        state changes (the next optimizer step). `extra` is this rank's trainer state (step,
        sampler, RNG), taken now."""
        self.wait()
        pieces = _pieces(state)
        layout = self._plan(pieces)
        slot = step % 2
        self._path(slot, "pt").unlink(missing_ok=True)  # the slot is invalid while it is rewritten
        objects = {k: v for k, v in state.items() if not isinstance(v, Boxes) and not torch.is_tensor(v)}
        index = {"step": step, "rank": self.rank, "world": self.world, "entries": layout.entries,
                 "nbytes": layout.nbytes, "objects": objects, "extra": extra}
        sources = [t.detach() for _, _, _, t in pieces]
        self._pending = self._pool.submit(self._publish, slot, index, sources)

    def _publish(self, slot: int, index: dict[str, Any], sources: list[torch.Tensor]) -> None:
        # The next step's forward and backward only read the state, so the copy overlaps them;
        # the trainer waits for it (wait()) before the optimizer changes anything.
        with torch.no_grad():
            for view, t in zip(self._views[slot], sources):
                view.copy_(t)
        path = self._path(slot, "pt")
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(index, tmp)
        os.replace(tmp, path)

    def wait(self) -> None:
        """Until the last snapshot is copied and its index published."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, remove: bool = False) -> None:
        """Stop the background thread; with `remove`, delete this rank's snapshot files."""
        self.wait()
        self._pool.shutdown(wait=True)
        self._views = [[], []]
        if remove:
            for slot in (0, 1):
                for suffix in ("pt", "bin"):
                    self._path(slot, suffix).unlink(missing_ok=True)


def _view(storage: torch.UntypedStorage, e: dict[str, Any]) -> torch.Tensor:
    dtype = e["dtype"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    t = torch.empty(0, dtype=dtype)
    t.set_(storage, e["byte_offset"] // itemsize, e["sizes"])
    return t


def clear_snapshots(directory: str | Path) -> None:
    """Remove every snapshot file in `directory` (a new or resumed run starts its own)."""
    d = Path(directory)
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name.startswith(("rank_", ".rank_")):
            p.unlink(missing_ok=True)


@dataclass
class Snapshot:
    """One complete snapshot: every rank of the run that wrote it, at one step."""

    directory: Path
    step: int
    world: int
    indices: list[dict[str, Any]]  # per old rank
    slots: list[int]

    def __fspath__(self) -> str:
        return str(self.directory)

    def __str__(self) -> str:
        return f"{self.directory} (in-memory snapshot of step {self.step})"

    def trainer_state(self) -> dict[str, Any]:
        """The trainer state in the form a checkpoint's state.pt has (RNG per old rank)."""
        first = self.indices[0]["extra"]
        state = {k: v for k, v in first.items() if k not in ("rng", "cuda_rng")}
        state["rng"] = [ix["extra"]["rng"] for ix in self.indices]
        cuda = [ix["extra"].get("cuda_rng") for ix in self.indices]
        if any(c is not None for c in cuda):
            state["cuda_rng"] = cuda
        return state

    def reader(self) -> "SnapshotReader":
        return SnapshotReader(self)


def find_snapshot(directory: str | Path) -> Snapshot | None:
    """The newest step for which every rank of one run has a complete snapshot here, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found: dict[tuple[int, int], dict[int, tuple[int, dict]]] = {}  # (world, step) -> rank -> (slot, index)
    for p in d.iterdir():
        m = INDEX.match(p.name)
        if not m:
            continue
        try:
            index = torch.load(p, map_location="cpu", weights_only=False)  # our own file in /dev/shm
            data = p.with_suffix(".bin")
            if data.stat().st_size < index["nbytes"]:
                continue
        except Exception as exc:  # a torn or foreign file: not a snapshot
            log.warning("ignoring snapshot file %s (%s)", p, exc)
            continue
        found.setdefault((index["world"], index["step"]), {})[int(m.group(1))] = (int(m.group(2)), index)
    complete = [(step, world, ranks) for (world, step), ranks in found.items()
                if sorted(ranks) == list(range(world))]
    if not complete:
        return None
    step, world, ranks = max(complete, key=lambda c: c[0])
    return Snapshot(d, step, world, [ranks[r][1] for r in range(world)], [ranks[r][0] for r in range(world)])


class SnapshotReader(StorageReader):
    """torch.distributed.checkpoint reads a snapshot as if it were a checkpoint (any layout)."""

    def __init__(self, snapshot: Snapshot):
        super().__init__()
        self.snap = snapshot
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._where: dict[MetadataIndex, tuple[int, dict[str, Any]]] = {}
        self._objects: dict[str, Any] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md: dict[str, Any] = {}
        for rank, index in enumerate(self.snap.indices):
            for e in index["entries"]:
                tmd = md.setdefault(e["key"], TensorStorageMetadata(
                    properties=TensorProperties(dtype=e["dtype"]), size=torch.Size(e["size"]), chunks=[]))
                chunk = ChunkStorageMetadata(offsets=torch.Size(e["offsets"]), sizes=torch.Size(e["sizes"]))
                idx = MetadataIndex(e["key"], chunk.offsets)
                if idx not in self._where:  # replicas hold the same values: the first one serves
                    tmd.chunks.append(chunk)
                    self._where[idx] = (rank, e)
            for key, obj in index["objects"].items():
                self._objects.setdefault(key, obj)
                md.setdefault(key, BytesStorageMetadata())
        return Metadata(state_dict_metadata=md)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._where:
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _storage(self, rank: int) -> torch.UntypedStorage:
        if rank not in self._storages:
            path = self.snap.directory / f"rank_{rank:05d}.slot{self.snap.slots[rank]}.bin"
            self._storages[rank] = torch.UntypedStorage.from_file(
                str(path), shared=False, nbytes=self.snap.indices[rank]["nbytes"])
        return self._storages[rank]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture:
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(self._objects[req.storage_index.fqn], buf)
                buf.seek(0)
                planner.load_bytes(req, buf)
                continue
            rank, e = self._where[MetadataIndex(req.storage_index.fqn, req.storage_index.offset)]
            src = _view(self._storage(rank), e)
            for dim, (off, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                src = src.narrow(dim, off, n)
            target = planner.resolve_tensor(req).detach()
            target.copy_(src)
            planner.commit_tensor(req, target)
        fut: TorchFuture = TorchFuture()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False
