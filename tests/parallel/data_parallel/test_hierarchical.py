"""Hierarchical all-reduce: same gradients as the flat one; only node leaders cross nodes."""

from __future__ import annotations

import pytest
import torch

from plait.config import ParallelConfig
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel.data_parallel.hierarchical import build_hierarchical_hook
from plait.parallel import parallelize
from tests.helpers import tiny_model_config
from tests.parallel.data_parallel.test_reducer import _global_batch, _reference_grads


def _hierarchical_grads(node_size: int, bucket_mb: float):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    hook = build_hierarchical_hook(mesh, node_size)
    reducer = GradientReducer(model, mesh.dp_group, bucket_mb=bucket_mb, comm_hook=hook)
    x, y = _global_batch()
    per = x.size(0) // mesh.dp_size
    sl = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    model(x[sl], y[sl])[1].backward()
    reducer.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, hook.intra.wire, hook.inter.wire, reducer.bytes_per_step


@pytest.mark.parametrize("node_size,bucket_mb", [(2, 25.0), (2, 0.01), (1, 0.01), (4, 25.0)])
def test_hierarchical_matches_one_process(pools, node_size, bucket_mb):
    ref = _reference_grads()
    results = pools(4).run(_hierarchical_grads, node_size, bucket_mb)
    for grads, *_ in results:
        for name, g in grads.items():
            assert torch.allclose(g, ref[name], atol=1e-6, rtol=0), name


def test_only_leaders_use_the_slow_links(pools):
    results = pools(4).run(_hierarchical_grads, 2, 25.0)
    size = results[0][3]
    for rank, (_, intra, inter, _) in enumerate(results):
        assert intra == 2 * size  # reduce to the leader, broadcast back
        # Two nodes: each leader all-reduces over 2 leaders (2(n-1)/n · B = B); others send nothing.
        assert inter == (size if rank in (0, 2) else 0)


def test_node_size_must_divide_dp():
    with pytest.raises(ConfigError, match=r"parallel.node_size=3 must divide the data-parallel size 4"):
        from plait.config import check_parallel
        check_parallel(ParallelConfig(node_size=3), dp=4)
    with pytest.raises(ConfigError, match="node_size=-1"):
        parallelize(GPT(tiny_model_config()), ParallelMesh.single(), ParallelConfig(node_size=-1))
