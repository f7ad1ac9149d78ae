"""ParallelMesh: the dp × pp × tp layout of the processes of one job, and its process groups.

Ranks are laid out Megatron-style with tp fastest, then dp, then pp:

    rank = (pp_index * dp + dp_index) * tp + tp_index

so the ranks of one tensor-parallel group are neighbours (one node, fast links) and pipeline
stages are furthest apart. The mesh is an explicit object handed to everything that
communicates; plait keeps no process-group state at module level.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.errors import MeshError

log = logging.getLogger(__name__)

DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the three mesh dimensions."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def __str__(self) -> str:
        return f"mesh dp={self.dp} × pp={self.pp} × tp={self.tp}"

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension."""
        return {
            "tp": rank % self.tp,
            "dp": (rank // self.tp) % self.dp,
            "pp": rank // (self.tp * self.dp),
        }

    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def group_ranks(self, dim: str) -> list[list[int]]:
        """All groups along `dim`: each list holds the ranks that differ only in `dim`."""
        if dim not in DIMS:
            raise MeshError(f"mesh dimension {dim!r} is unknown; valid: {', '.join(DIMS)}")
        sizes = {"dp": self.dp, "pp": self.pp, "tp": self.tp}
        others = [d for d in DIMS if d != dim]
        groups = []
        for a in range(sizes[others[0]]):
            for b in range(sizes[others[1]]):
                fixed = {others[0]: a, others[1]: b}
                groups.append([self.rank_of(**{**fixed, dim: i}) for i in range(sizes[dim])])
        return groups


def resolve_shape(world_size: int, dp: int = 0, pp: int = 1, tp: int = 1) -> MeshShape:
    """Fill in dp (0 means "whatever is left") and check the product equals the world size."""
    for name, value in (("pp", pp), ("tp", tp)):
        if value < 1:
            raise MeshError(f"parallel.{name}={value} is invalid; valid: an integer ≥ 1")
    if dp < 0:
        raise MeshError(f"parallel.dp={dp} is invalid; valid: 0 (automatic) or an integer ≥ 1")
    if dp == 0:
        if world_size % (pp * tp):
            raise MeshError(
                f"world size {world_size} is not divisible by pp×tp = {pp}×{tp}; "
                f"choose a process count that is a multiple of {pp * tp}"
            )
        dp = world_size // (pp * tp)
    if dp * pp * tp != world_size:
        raise MeshError(
            f"parallel dp×pp×tp = {dp}×{pp}×{tp} = {dp * pp * tp} does not match the "
            f"world size {world_size}; set parallel.dp = 0 to fill it automatically"
        )
    return MeshShape(dp=dp, pp=pp, tp=tp)


@dataclass
class ParallelMesh:
    """The process layout of a job and one process group per mesh dimension for this rank.

    Build it with :meth:`from_env` (inside a torchrun / plait launch) or :meth:`build` (when the
    default process group already exists, e.g. in tests).
    """

    shape: MeshShape
    rank: int
    device: torch.device
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    group_ranks: dict[str, list[int]] = field(default_factory=dict)
    # torch's DeviceMesh over the same ranks, dims ("pp", "dp", "tp"), so torch-native pieces
    # (DTensor, FSDP2, torch.distributed.checkpoint) compose with plait's groups.
    device_mesh: "DeviceMesh | None" = None

    def size(self, dim: str) -> int:
        """The size of mesh dimension `dim` ("dp", "pp" or "tp")."""
        if dim not in DIMS:
            raise MeshError(f"mesh dimension {dim!r} is unknown; valid: {', '.join(DIMS)}")
        return getattr(self.shape, dim)

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """This rank's process group along `dim` (None on a one-process mesh)."""
        if dim not in DIMS:
            raise MeshError(f"mesh dimension {dim!r} is unknown; valid: {', '.join(DIMS)}")
        return self.groups.get(dim)

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def coords(self) -> dict[str, int]:
        return self.shape.coords(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def dp_size(self) -> int:
        return self.shape.dp

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def tp_size(self) -> int:
        return self.shape.tp

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def pp_size(self) -> int:
        return self.shape.pp

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.groups.get("dp")

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.groups.get("tp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.groups.get("pp")

    @property
    def is_main(self) -> bool:
        """True on the one rank that writes files and logs for the whole job."""
        return self.rank == 0

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelMesh":
        """A mesh of one process with no process groups: everything runs locally."""
        return cls(shape=MeshShape(), rank=0, device=torch.device(device))

    @classmethod
    def build(cls, dp: int = 0, pp: int = 1, tp: int = 1,
              device: str | torch.device | None = None) -> "ParallelMesh":
        """Make the dp/pp/tp groups over the already initialised default process group.

        Every rank must call this with the same arguments (group creation is collective).
        """
        if not dist.is_initialized():
            return cls.single(device or "cpu")
        world, rank = dist.get_world_size(), dist.get_rank()
        shape = resolve_shape(world, dp=dp, pp=pp, tp=tp)
        if device is None:
            device = default_device()
        device = torch.device(device)
        # DeviceMesh lays ranks out row-major over (pp, dp, tp): the same order as MeshShape.
        # Building it is collective over the world: every rank makes every group.
        device_mesh = init_device_mesh(device.type, (shape.pp, shape.dp, shape.tp), mesh_dim_names=DIMS)
        mesh = cls(shape=shape, rank=rank, device=device, device_mesh=device_mesh)
        for dim in DIMS:
            mesh.groups[dim] = device_mesh.get_group(dim) if world > 1 else dist.group.WORLD
            mesh.group_ranks[dim] = next(r for r in shape.group_ranks(dim) if rank in r)
        log.debug("rank %d mesh %s coords %s", rank, shape, mesh.coords)
        return mesh

    @classmethod
    def from_config(cls, parallel: Any, device: str | torch.device | None = None) -> "ParallelMesh":
        """The mesh a [parallel] config (a ParallelConfig: dp, pp, tp) asks for, over the already
        initialised default process group (one process when there is none)."""
        return cls.build(dp=parallel.dp, pp=parallel.pp, tp=parallel.tp, device=device)

    @classmethod
    def from_env(cls, dp: int = 0, pp: int = 1, tp: int = 1, backend: str | None = None,
                 timeout_s: float = 600.0, device: str | torch.device | None = None) -> "ParallelMesh":
        """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, ...).

        `device` "cpu" keeps the job on the CPU (with Gloo) even where CUDA exists; None picks
        CUDA when present (one device per local rank), else the CPU.
        """
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MeshError(
                f"environment variables {', '.join(missing)} are not set; start plait through "
                "`plait train --nproc N` or torchrun"
            )
        device = default_device() if device is None else torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(index)
            device = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend or ("nccl" if device.type == "cuda" else "gloo"),
                timeout=datetime.timedelta(seconds=timeout_s), **_round_store(timeout_s),
            )
        return cls.build(dp=dp, pp=pp, tp=tp, device=device)

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def __repr__(self) -> str:
        s = self.shape
        return f"ParallelMesh(dp={s.dp}, pp={s.pp}, tp={s.tp}, rank={self.rank}, coords={self.coords})"


def _round_store(timeout_s: float) -> dict[str, Any]:
    """Under plait's elastic agent, the process group's store keys live in this rendezvous
    round's namespace (PLAIT_STORE_NAMESPACE), so a restarted group never reads the addresses
    an earlier round left in the store; elsewhere torch's env:// rendezvous as usual."""
    namespace = os.environ.get("PLAIT_STORE_NAMESPACE")
    if not namespace:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(namespace, store), "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"])}


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
