"""ParallelMesh: rank layout, group membership, and shape errors."""

from __future__ import annotations

import pytest

from plait.errors import MeshError
from plait.mesh import MeshShape, ParallelMesh, resolve_shape


def test_layout_is_tp_fastest_then_dp_then_pp():
    s = MeshShape(dp=2, pp=2, tp=2)
    assert s.coords(0) == {"tp": 0, "dp": 0, "pp": 0}
    assert s.coords(1) == {"tp": 1, "dp": 0, "pp": 0}
    assert s.coords(2) == {"tp": 0, "dp": 1, "pp": 0}
    assert s.coords(4) == {"tp": 0, "dp": 0, "pp": 1}
    assert s.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert s.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert s.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for r in range(8):
        assert s.rank_of(**s.coords(r)) == r


def test_every_rank_is_in_exactly_one_group_per_dim():
    s = MeshShape(dp=3, pp=2, tp=2)
    for dim in ("dp", "pp", "tp"):
        flat = sorted(r for g in s.group_ranks(dim) for r in g)
        assert flat == list(range(12))


def test_resolve_shape_fills_dp_and_checks_product():
    assert resolve_shape(8, dp=0, pp=2, tp=2) == MeshShape(dp=2, pp=2, tp=2)
    with pytest.raises(MeshError, match="not divisible"):
        resolve_shape(6, dp=0, pp=4)
    with pytest.raises(MeshError, match="does not match the world size 4"):
        resolve_shape(4, dp=3)
    with pytest.raises(MeshError, match="parallel.tp"):
        resolve_shape(4, tp=0)


def test_from_env_without_launcher_is_a_clear_error(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(MeshError, match="plait train --nproc"):
        ParallelMesh.from_env()


def _mesh_report():
    mesh = ParallelMesh.build(dp=2)
    import torch
    import torch.distributed as dist
    t = torch.tensor([float(mesh.rank)])
    dist.all_reduce(t, group=mesh.dp_group)
    return mesh.coords, mesh.group_ranks["dp"], t.item()


def test_groups_built_over_a_real_process_group(pools):
    out = pools(2).run(_mesh_report)
    assert out[0] == ({"tp": 0, "dp": 0, "pp": 0}, [0, 1], 1.0)
    assert out[1] == ({"tp": 0, "dp": 1, "pp": 0}, [0, 1], 1.0)
