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


def _device_mesh_report():
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    from plait.config import ParallelConfig

    mesh = ParallelMesh.from_config(ParallelConfig(dp=2, tp=2))
    dm = mesh.device_mesh
    groups = {d: sorted(dist.get_process_group_ranks(dm.get_group(d))) for d in ("pp", "dp", "tp")}
    # A torch-native DTensor on plait's tp dimension: each tp rank holds half of the rows.
    full = torch.arange(8.0).reshape(4, 2)
    shard = distribute_tensor(full, dm["tp"], [Shard(0)]).to_local()
    return {"names": dm.mesh_dim_names, "shape": tuple(dm.shape), "groups": groups,
            "plait_groups": dict(mesh.group_ranks), "shard": shard.tolist(), "tp_rank": mesh.tp_rank,
            "sizes": {d: mesh.size(d) for d in ("dp", "pp", "tp")}}


def test_mesh_exposes_a_torch_device_mesh_with_the_same_groups(pools):
    for out in pools(4).run(_device_mesh_report):
        assert out["names"] == ("pp", "dp", "tp") and out["shape"] == (1, 2, 2)
        assert out["groups"] == {d: sorted(r) for d, r in out["plait_groups"].items()}
        assert out["sizes"] == {"dp": 2, "pp": 1, "tp": 2}
        rows = [[0.0, 1.0], [2.0, 3.0]] if out["tp_rank"] == 0 else [[4.0, 5.0], [6.0, 7.0]]
        assert out["shard"] == rows


def test_unknown_mesh_dimension_is_a_clear_error():
    mesh = ParallelMesh.single()
    with pytest.raises(MeshError, match="mesh dimension 'ep' is unknown; valid: pp, dp, tp"):
        mesh.size("ep")
