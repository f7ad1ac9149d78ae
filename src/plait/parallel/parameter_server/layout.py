"""Who is who in a parameter-server job: ranks [0, S) serve parameters, the others work.

Servers take the lowest ranks so that rank 0 (which hosts torch.distributed's store when no
launcher agent does) is a process the job cannot lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from plait.errors import ConfigError


@dataclass(frozen=True)
class PSLayout:
    """The roles of the ranks of the default process group, and the servers' own group.

    `server_group` joins the servers only (None with one server): synchronous mode uses it to
    clip the averaged gradient by its global norm, which spans every server's shard.
    """

    world_size: int
    n_servers: int
    rank: int
    server_group: "dist.ProcessGroup | None" = None

    def __post_init__(self) -> None:
        if self.n_servers < 1:
            raise ConfigError(f"parallel.ps.servers={self.n_servers} must be ≥ 1 for a parameter-server job")
        if self.n_servers >= self.world_size:
            raise ConfigError(
                f"parallel.ps.servers={self.n_servers} leaves no worker among {self.world_size} "
                f"processes; use at most {self.world_size - 1} servers or more processes"
            )

    @classmethod
    def build(cls, n_servers: int) -> "PSLayout":
        """Roles over the initialised default group; collective (every rank must call it).

        It returns when every rank has arrived, so call it once a process is ready to serve or
        train: servers judge workers' liveness from then on.
        """
        if not dist.is_initialized():
            raise ConfigError("the parameter server needs torch.distributed; start it with "
                              "`plait train --nproc N` or torchrun")
        world, rank = dist.get_world_size(), dist.get_rank()
        cls(world, n_servers, rank)  # checks the counts before any group is made
        group = dist.new_group(list(range(n_servers))) if n_servers > 1 else None
        dist.barrier()
        return cls(world, n_servers, rank, group)

    @property
    def servers(self) -> list[int]:
        return list(range(self.n_servers))

    @property
    def workers(self) -> list[int]:
        return list(range(self.n_servers, self.world_size))

    @property
    def n_workers(self) -> int:
        return self.world_size - self.n_servers

    @property
    def is_server(self) -> bool:
        return self.rank < self.n_servers

    @property
    def server_index(self) -> int:
        return self.rank

    @property
    def worker_index(self) -> int:
        """0 … n_workers−1 on a worker (its data shard), −1 on a server."""
        return self.rank - self.n_servers if not self.is_server else -1
