"""Hierarchical all-reduce for two-level networks: fast links inside a node, slow ones between.

The dp group is cut into nodes of `node_size` consecutive dp ranks. A bucket is first reduced
onto each node's leader (its first rank) over the fast intra-node links, the leaders all-reduce
among themselves over the slow links, and each leader broadcasts the sum back inside its node.
Only one rank per node uses the slow network, with 1/node_size of a flat ring's traffic crossing
it. The reduce is issued asynchronously during backward; the leaders' all-reduce and the
broadcast run when the reducer waits for the bucket.

The groups come from the mesh: every dp group of the mesh is cut the same way, and all ranks
create every group in the same order (`new_group` is collective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.parallel.data_parallel.hooks import Pending, WireStats
from plait.parallel.data_parallel.reducer import Bucket


@dataclass
class NodeGroups:
    """This rank's node group and, on node leaders, the group of all leaders of its dp group."""

    node: "dist.ProcessGroup"
    node_ranks: list[int]
    leaders: "dist.ProcessGroup | None"
    leader_ranks: list[int]

    @property
    def leader(self) -> int:
        """Global rank of this rank's node leader."""
        return self.node_ranks[0]

    @classmethod
    def build(cls, mesh: ParallelMesh, node_size: int) -> "NodeGroups":
        """Collective over the whole world: cut every dp group into nodes of `node_size` ranks."""
        dp = mesh.dp_size
        if node_size < 1 or dp % node_size:
            raise ConfigError(f"parallel.node_size={node_size} must divide the data-parallel size {dp}")
        mine: dict[str, object] = {}
        for ranks in mesh.shape.group_ranks("dp"):
            nodes = [ranks[i:i + node_size] for i in range(0, dp, node_size)]
            for node in nodes:
                g = dist.new_group(node)
                if mesh.rank in node:
                    mine["node"], mine["node_ranks"] = g, node
            leaders = [node[0] for node in nodes]
            g = dist.new_group(leaders)
            if mesh.rank in ranks:
                mine["leader_ranks"] = leaders
                mine["leaders"] = g if mesh.rank in leaders else None
        return cls(**mine)


class HierarchicalAllReduce:
    """A reducer hook: reduce to the node leader, all-reduce across leaders, broadcast back."""

    def __init__(self, groups: NodeGroups):
        self.groups = groups
        self.intra = WireStats()  # bytes over the fast links
        self.inter = WireStats()  # bytes over the slow links (leaders only)

    @property
    def stats(self) -> WireStats:
        """Bytes over both levels together."""
        s = WireStats()
        for part in (self.intra, self.inter):
            s.payload += part.payload
            s.wire += part.wire
            s.calls += part.calls
        return s

    def __call__(self, bucket: Bucket, group) -> Pending:
        g = self.groups
        buf = bucket.buffer
        self.intra.point(buf)
        work = dist.reduce(buf, dst=g.leader, group=g.node, async_op=True)

        def finish() -> None:
            if g.leaders is not None and len(g.leader_ranks) > 1:
                self.inter.all_reduce(buf, len(g.leader_ranks))
                dist.all_reduce(buf, group=g.leaders)
            self.intra.point(buf)
            dist.broadcast(buf, src=g.leader, group=g.node)

        return Pending(work, finish)


def build_hierarchical_hook(mesh: ParallelMesh, node_size: int) -> HierarchicalAllReduce:
    return HierarchicalAllReduce(NodeGroups.build(mesh, node_size))
