"""Plans: GPT.plan() splits the GPT with exactly Megatron's communication; bad plans are clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import Config, ParallelConfig, validate
from plait.errors import ConfigError, PlanError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.testing.comm_counter import CommCounter
from plait.parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelHead
from plait.parallel.tensor_parallel.plan import ColumnParallel, resolve_plan
from plait.parallel import parallelize
from tests.helpers import tiny_model_config


def _batch(vocab: int = 256, n: int = 4, t: int = 16):
    data = torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(0))
    return data[:, :-1], data[:, 1:]


def _count_collectives(sp: bool) -> dict:
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    torch.manual_seed(0)
    model = parallelize(GPT(tiny_model_config(n_head=4)), mesh,
                        ParallelConfig(tp=mesh.tp_size, sequence_parallel=sp))
    x, y = _batch()
    with CommCounter(mesh) as fwd:
        _, loss = model(x, y)
    with CommCounter(mesh) as bwd:
        loss.backward()
    return {"fwd": fwd.summary(), "bwd": bwd.summary(), "n_layer": len(model.module.blocks),
            "qkv": type(model.module.blocks[0].attn.qkv).__name__,
            "proj": type(model.module.blocks[0].attn.proj).__name__,
            "head": type(model.module.head).__name__,
            "tied": model.module.head.weight is model.module.tok_emb.weight}


def _calls(summary: dict, group: str, op: str) -> int:
    return summary.get(group, {}).get(op, {}).get("calls", 0)


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_plan_forward_has_two_all_reduces_per_block(pools, tp):
    for r in pools(tp).run(_count_collectives, False):
        layers = r["n_layer"]
        assert (r["qkv"], r["proj"], r["head"]) == (
            ColumnParallelLinear.__name__, RowParallelLinear.__name__, VocabParallelHead.__name__)
        assert r["tied"]
        # 2 per block (attention, MLP) + 1 for the vocab-parallel embedding.
        assert _calls(r["fwd"], "tp", "all_reduce") == 2 * layers + 1
        # The loss gathers one (log-sum-exp, target logit) pair per token; logits stay sharded.
        assert _calls(r["fwd"], "tp", "all_gather_single") == 1
        assert set(r["fwd"]) == {"tp"}
        # Backward: the dual all-reduce before each column layer (2 per block + the head).
        assert _calls(r["bwd"], "tp", "all_reduce") == 2 * layers + 1
        assert set(r["bwd"]["tp"]) == {"all_reduce"}


def test_gpt_plan_with_sequence_parallelism_swaps_all_reduce_for_gather_scatter(pools):
    for r in pools(2).run(_count_collectives, True):
        layers = r["n_layer"]
        fwd, bwd = r["fwd"], r["bwd"]
        assert _calls(fwd, "tp", "all_reduce") == 0
        # Each block: all-gather before qkv and fc, reduce-scatter after both projections;
        # the embedding reduce-scatters, the head all-gathers, the loss gathers its statistics.
        assert _calls(fwd, "tp", "reduce_scatter_single") == 2 * layers + 1
        assert _calls(fwd, "tp", "all_gather_single") == 2 * layers + 1 + 1
        assert _calls(bwd, "tp", "all_gather_single") == 2 * layers + 1
        assert _calls(bwd, "tp", "reduce_scatter_single") == 2 * layers + 1
        assert _calls(bwd, "tp", "all_reduce") == 0
        # The same bytes as all-reduce would move, in two halves: a reduce-scatter hands over
        # the full activation, an all-gather 1/tp of it.
        act = 4 * 16 * 32 * 4  # B × T × C fp32
        assert fwd["tp"]["reduce_scatter_single"]["bytes"] == (2 * layers + 1) * act


# --- bad input: no process group needed -------------------------------------------------------


def test_gpt_plan_resolves_on_the_gpt():
    model = GPT(tiny_model_config(n_head=4))
    resolved = {name: style for name, _, style in resolve_plan(model, GPT.plan(), tp=4)}
    assert repr(resolved["blocks.1.attn.qkv"]) == "column(fused=3)"
    assert repr(resolved["blocks.0.mlp.proj"]) == "row"
    assert repr(resolved["head"]) == "vocab_head"


def test_heads_not_divisible_by_tp_is_a_plan_error():
    with pytest.raises(PlanError, match=r"blocks\.0\.attn: n_head=2 .* not divisible by parallel\.tp=4"):
        resolve_plan(GPT(tiny_model_config(n_head=2)), GPT.plan(), tp=4)


def test_config_rejects_heads_not_divisible_by_tp():
    cfg = Config.from_dict({"model": {"n_head": 6, "n_embd": 48}, "parallel": {"tp": 4}})
    with pytest.raises(ConfigError, match=r"model\.n_head=6 is not divisible by parallel\.tp=4"):
        validate(cfg)


def test_config_rejects_sequence_parallel_with_indivisible_block_size():
    cfg = Config.from_dict({"model": {"n_head": 4, "block_size": 18},
                            "parallel": {"tp": 4, "sequence_parallel": True}})
    with pytest.raises(ConfigError, match=r"model\.block_size=18"):
        validate(cfg)
    cfg.parallel.sequence_parallel = False
    validate(cfg)  # without sequence parallelism any sequence length is fine


def test_config_accepts_tp_that_divides_the_heads():
    validate(Config.from_dict({"model": {"n_head": 4}, "parallel": {"tp": 2}}), world_size=4)
    with pytest.raises(ConfigError, match=r"parallel\.tp=3"):
        validate(Config.from_dict({"model": {"n_head": 4}, "parallel": {"tp": 3}}))


def test_plan_entry_naming_no_module_is_an_error():
    plan = {**GPT.plan(), "blocks.*.mlp.gate": "column"}
    with pytest.raises(PlanError, match=r"'blocks\.\*\.mlp\.gate' names no module of GPT"):
        resolve_plan(GPT(tiny_model_config()), plan, tp=2)


def test_style_that_does_not_fit_the_module_is_an_error():
    with pytest.raises(PlanError, match=r"style column fits Linear, but 'blocks\.0\.ln1' is a LayerNorm"):
        resolve_plan(GPT(tiny_model_config()), {"blocks.*.ln1": "column"}, tp=2)
    with pytest.raises(PlanError, match=r"style 'heads' fits attention modules .* 'blocks\.0\.mlp'"):
        resolve_plan(GPT(tiny_model_config()), {"blocks.*.mlp": "heads"}, tp=2)


def test_unknown_style_is_an_error_listing_valid_ones():
    with pytest.raises(PlanError, match=r"style 'colum' is unknown; valid: column, row"):
        resolve_plan(GPT(tiny_model_config()), {"blocks.*.mlp.fc": "colum"}, tp=2)


def test_module_matched_twice_is_an_error():
    plan = {"blocks.*.mlp.fc": "column", "blocks.0.mlp.*": "row"}
    with pytest.raises(PlanError, match=r"'blocks\.0\.mlp\.fc' is matched by plan entries"):
        resolve_plan(GPT(tiny_model_config()), plan, tp=2)


def test_dimension_not_divisible_by_tp_is_an_error():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8))
    with pytest.raises(PlanError, match=r"0: out_features=6 is not divisible by parallel\.tp=4"):
        resolve_plan(model, {"0": "column", "1": "row"}, tp=4)
    with pytest.raises(PlanError, match=r"out_features/3=2 is not divisible"):
        resolve_plan(model, {"0": ColumnParallel(fused=3)}, tp=4)


def _parallelize_errors() -> list[str]:
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    messages = []
    attempts = [
        lambda: parallelize(nn.Sequential(nn.Linear(4, 4)), mesh),  # no plan() on the model
        lambda: parallelize(GPT(tiny_model_config()), mesh, plan={"blocks.*.ln9": "row"}),
        lambda: parallelize(GPT(tiny_model_config()), mesh, ParallelConfig(tp=2, compression="bf16")),
        lambda: parallelize(GPT(tiny_model_config()), mesh, ParallelConfig()),  # tp=1 config, tp=2 mesh
    ]
    for attempt in attempts:
        try:
            attempt()
            messages.append("no error")
        except (PlanError, ConfigError) as exc:
            messages.append(str(exc))
    # The pool is still healthy: a plan error raises before any collective.
    dist.barrier()
    return messages


def test_parallelize_errors_are_clear_and_raised_before_communicating(pools):
    for msgs in pools(2).run(_parallelize_errors):
        assert "Sequential has no plan(); pass plan= to parallelize() to split it over tp=2" in msgs[0]
        assert "'blocks.*.ln9' names no module of GPT" in msgs[1]
        assert "parallel.tp=2 cannot be combined with parallel.compression='bf16'" in msgs[2]
        assert "parallel.tp=1 does not match the mesh, which has tp=2" in msgs[3]


def _hybrid_step_comm() -> dict:
    mesh = ParallelMesh.build(dp=2, tp=2)
    torch.manual_seed(0)
    model = parallelize(GPT(tiny_model_config(n_head=4)), mesh, ParallelConfig(tp=2, bucket_mb=0.01))
    x, y = _batch()
    with CommCounter(mesh) as comm:
        model.forward_backward([(x[mesh.dp_rank::2], y[mesh.dp_rank::2])])
    local = sum(p.numel() * p.element_size() for p in model.module.parameters())
    return {"summary": comm.summary(), "dp_bytes": comm.bytes("dp"), "bucket_bytes": model.reducer.bytes_per_step,
            "local_param_bytes": local}


def test_hybrid_reduces_gradient_shards_over_dp_only(pools):
    for r in pools(4).run(_hybrid_step_comm):
        assert set(r["summary"]["dp"]) == {"all_reduce"}
        # The dp all-reduce carries this rank's shards (plus one used-flag per parameter) only.
        assert r["dp_bytes"] == r["bucket_bytes"]
        assert r["local_param_bytes"] < r["dp_bytes"] < r["local_param_bytes"] * 1.01
        assert set(r["summary"]["tp"]) == {"all_reduce", "all_gather_single"}
