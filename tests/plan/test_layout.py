"""Named-dimension layouts: the Megatron layout is GPT.plan(); each illegal layout is refused with
the rule it breaks; a compiled layout trains as the hand-written one does."""

from __future__ import annotations

import pytest

from plait.config import ConfigError, load_config
from plait.errors import LayoutError
from plait.models import GPT
from plait.plan.layout import (
    MEGATRON,
    check_layout,
    compile_layout,
    parse_layout,
    tp_plan,
)
from plait.plan.shapes import ModelShape, shape_from_config
from tests.helpers import max_abs_diff, tiny_model_config

TINY = ModelShape("tiny", n_layer=4, n_head=4, n_embd=32, seq=16, vocab=256)


def test_megatron_layout_compiles_to_the_models_own_plan():
    compiled = compile_layout(MEGATRON, TINY, dp=2, pp=2, tp=2, global_batch=8)
    assert compiled.tp_plan == GPT.plan()
    assert (compiled.dp, compiled.pp, compiled.tp) == (2, 2, 2)
    assert compiled.full_tensor_parallel
    # [embedding, 4 blocks, head] cut in two contiguous, non-empty runs
    (a, b), (c, d) = compiled.pipeline_cut
    assert a == 0 and b == c and d == TINY.n_layer + 2 and a < b < d


def test_partial_layout_splits_only_what_it_names():
    plan = tp_plan({"heads": "tp"})
    assert plan["blocks.*.attn.qkv"] == "column(fused=3)" and plan["blocks.*.attn.proj"] == "row"
    assert plan["blocks.*.attn"] == "heads"
    for absent in ("blocks.*.mlp.fc", "blocks.*.mlp.proj", "tok_emb", "head", "loss_fn"):
        assert absent not in plan
    assert set(tp_plan({"mlp": "tp"})) - set(tp_plan({})) >= {"blocks.*.mlp.fc", "blocks.*.mlp.proj"}
    assert tp_plan({"vocab": "tp"})["head"] == "vocab_head"
    assert tp_plan({"batch": "dp"}) == {}


@pytest.mark.parametrize("layout,sizes,rule", [
    ({"width": "tp"}, {"tp": 2}, "tensor dimension 'width'"),
    ({"heads": "mp"}, {"tp": 2}, "mesh dimension 'mp'"),
    # Mesh-TF: a tensor lays at most one dimension on each mesh dimension
    ({"hidden": "tp", "heads": "tp"}, {"tp": 2}, ("attn.qkv.weight (layers, hidden, heads, head_dim) "
                                               "would lay both hidden and heads on tp")),
    ({"batch": "tp", "heads": "tp"}, {"tp": 2}, ("q, k, v (batch, sequence, heads, head_dim) would lay "
                                              "both batch and heads on tp")),
    ({"sequence": "tp", "mlp": "tp"}, {"tp": 2}, ("mlp activation (batch, sequence, mlp) would lay both "
                                               "sequence and mlp on tp")),
    ({"hidden": "tp", "mlp": "tp"}, {"tp": 2}, "mlp.fc.weight (layers, hidden, mlp) would lay both"),
    # Mesh-TF: a split dimension divides evenly
    ({"heads": "tp"}, {"tp": 3}, "heads (attention heads (model.n_head)) has size 4, not divisible by tp=3"),
    ({"vocab": "tp"}, {"tp": 3}, ("vocab (the token vocabulary (model.vocab_size)) has size 256, not "
                                 "divisible by tp=3; choose a tp that divides 256 or pad model.vocab_size")),
    ({"batch": "dp"}, {"dp": 3}, "batch (the sequences of a step) has size 8, not divisible by dp=3"),
    ({"layers": "pp"}, {"pp": 7}, "the pipeline needs at least one of the 6 layers"),
    # what plait compiles
    ({"hidden": "tp"}, {"tp": 2}, "plait has no strategy that lays hidden on tp"),
    ({"heads": "dp", "batch": "tp"}, {"dp": 2, "tp": 2}, "plait has no strategy that lays heads on dp"),
    ({"layers": "dp"}, {"dp": 2}, "plait has no strategy that lays layers on dp"),
    # no idle mesh dimension
    ({"batch": "dp"}, {"dp": 2, "tp": 2}, "mesh dimension tp=2 carries no tensor dimension"),
    ({"heads": "tp", "mlp": "tp", "vocab": "tp"}, {"dp": 2, "tp": 2}, ("mesh dimension dp=2 carries no "
                                                                       "tensor dimension")),
])
def test_illegal_layouts_are_refused_with_the_rule_they_break(layout, sizes, rule):
    full = {"dp": 1, "pp": 1, "tp": 1, **sizes}
    with pytest.raises(LayoutError) as err:
        check_layout(layout, TINY, full, global_batch=8)
    assert rule in str(err.value)


def test_interleaved_layers_must_split_evenly():
    with pytest.raises(LayoutError, match="must divide evenly into pp × virtual_stages = 6"):
        compile_layout({"layers": "pp"}, TINY, pp=2, virtual_stages=3)
    assert len(compile_layout({"layers": "pp"}, TINY, pp=2, virtual_stages=2).pipeline_cut) == 4


def test_parse_layout():
    assert parse_layout("batch=dp, heads=tp") == {"batch": "dp", "heads": "tp"}
    with pytest.raises(LayoutError, match="DIMENSION=MESH_DIM"):
        parse_layout("heads")


def test_config_layout_is_checked_where_the_config_is(tmp_path):
    cfg = load_config("examples/tp2_dp2.toml", ['parallel.layout={batch="dp", heads="tp", mlp="tp", vocab="tp"}'])
    assert cfg.parallel.layout == {"batch": "dp", "heads": "tp", "mlp": "tp", "vocab": "tp"}
    with pytest.raises(ConfigError, match=r"^parallel.layout: layout puts only heads on tp"):
        load_config("examples/tp2_dp2.toml", ['parallel.layout={batch="dp", heads="tp"}'])
    with pytest.raises(ConfigError, match=r"^parallel.layout: .*Mesh-TensorFlow"):
        load_config("examples/tp2_dp2.toml", ['parallel.layout={batch="dp", hidden="tp", heads="tp"}'])
    with pytest.raises(ConfigError, match="parallel.layout must be a table of strings"):
        load_config("examples/tp2_dp2.toml", ["parallel.layout=3"])
    # dp comes from the world size when the config leaves it automatic
    path = tmp_path / "c.toml"
    path.write_text('[parallel]\nlayout = { heads = "tp", mlp = "tp", vocab = "tp" }\ntp = 2\n')
    from plait.config import validate

    validate(load_config(path), world_size=2)
    with pytest.raises(ConfigError, match="dp=2 carries no tensor dimension"):
        validate(load_config(path), world_size=4)


@pytest.mark.parametrize("cost", ["params", "flops"])
def test_pipeline_cut_matches_the_runtimes_partition(cost):
    from plait.models.gpt_layers import gpt_pipeline_spec
    from plait.parallel.pipeline.partition import make_partition

    for kw, pp in (({"n_layer": 4, "n_embd": 32, "n_head": 2}, 2), ({"n_layer": 6, "n_embd": 64, "n_head": 4}, 3),
                   ({"n_layer": 3, "n_embd": 16, "n_head": 2, "vocab_size": 4096}, 4)):
        cfg = tiny_model_config(**kw)
        runtime = make_partition(gpt_pipeline_spec(GPT(cfg)), pp, cost=cost)
        ours = compile_layout({"layers": "pp"}, shape_from_config(cfg), pp=pp, partition=cost).pipeline_cut
        assert ours == runtime.bounds


def _train(layout: dict | None, sizes: dict, steps: int = 3) -> dict:
    """Train a tiny GPT for `steps` on this rank's share; the plan compiled from `layout`, or the
    model's own when None."""
    import torch
    import torch.distributed as dist

    import plait
    from plait.config import ParallelConfig, TrainConfig
    from plait.mesh import ParallelMesh

    cfg = tiny_model_config(n_layer=2, n_head=4, n_embd=32, block_size=16)
    mesh = ParallelMesh.build(**sizes, device="cpu") if dist.is_initialized() else ParallelMesh.single()
    torch.manual_seed(0)
    model = GPT(cfg)
    plan = None
    if layout is not None:
        plan = compile_layout(layout, shape_from_config(cfg), **sizes).tp_plan or None
    pm = plait.parallelize(model, mesh, ParallelConfig(**sizes), plan=plan)
    opt = pm.build_optimizer(TrainConfig(lr=1e-2, weight_decay=0.0))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        data = torch.randint(0, 256, (4, 17), generator=g)
        losses.append(float(pm.forward_backward([(data[:, :-1], data[:, 1:])])))
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = pm.checkpoint_state(opt)
    params = {k: v.detach().clone() for k, v in state["model"].items()} if state else None
    return {"losses": losses, "params": params}


def _both(layout_partial: dict) -> dict:
    sizes = {"tp": 2}
    return {"megatron": _train({"heads": "tp", "mlp": "tp", "vocab": "tp"}, sizes),
            "default": _train(None, sizes), "partial": _train(layout_partial, sizes)}


def test_compiled_layouts_train_like_the_hand_written_layout(pools):
    """tp=2: the Megatron layout trains bit for bit as GPT.plan() does; a layout that splits only
    heads and mlp (the vocabulary replicated) trains as one process does."""
    ranks = pools(2).run(_both, {"heads": "tp", "mlp": "tp"})
    one = _train(None, {})
    main = ranks[0]
    assert main["megatron"]["losses"] == main["default"]["losses"]
    assert max_abs_diff(main["megatron"]["params"], main["default"]["params"]) == 0.0
    # fp32, different reduction order: the tolerances of the tensor-parallel parity tests
    for variant in ("partial", "megatron"):
        assert main[variant]["losses"] == pytest.approx(one["losses"], abs=1e-5)
        assert max_abs_diff(main[variant]["params"], one["params"]) < 1e-4
