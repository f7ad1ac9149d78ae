"""CommCounter: calls and bytes per mesh group; nests; leaves torch.distributed as it found it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.mesh import ParallelMesh
from plait.testing.comm_counter import CommCounter


def _count() -> dict:
    mesh = ParallelMesh.build(dp=2, tp=2)
    original = dist.all_reduce
    x = torch.ones(10)
    with CommCounter(mesh) as outer:
        dist.all_reduce(x, group=mesh.dp_group)
        with CommCounter(mesh) as inner:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=mesh.tp_group)
            out = torch.empty(2 * 10)
            dist.all_gather_single(out, x, mesh.tp_group)  # group passed positionally
            dist.barrier()
        peer = mesh.rank ^ 1  # the other rank of this tp group
        ops = [dist.P2POp(dist.isend, torch.zeros(3), peer, mesh.tp_group),
               dist.P2POp(dist.irecv, torch.empty(3), peer, mesh.tp_group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return {"outer": outer.summary(), "inner": inner.summary(),
            "restored": dist.all_reduce is original, "tp_bytes": outer.bytes("tp"),
            "dp_calls": outer.calls("dp")}


def test_counter_records_calls_and_bytes_per_group(pools):
    for r in pools(4).run(_count):
        assert r["restored"]
        assert r["inner"] == {
            "tp": {"all_reduce": {"calls": 1, "bytes": 40}, "all_gather_single": {"calls": 1, "bytes": 40}},
            "world": {"barrier": {"calls": 1, "bytes": 0}},
        }
        outer = r["outer"]
        assert outer["dp"] == {"all_reduce": {"calls": 1, "bytes": 40}}
        assert outer["tp"]["isend"] == {"calls": 1, "bytes": 12}
        assert outer["tp"]["irecv"] == {"calls": 1, "bytes": 12}
        assert r["tp_bytes"] == 40 + 40 + 12 + 12
        assert r["dp_calls"] == 1
