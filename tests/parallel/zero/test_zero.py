"""ZeRO-1/2/3 and CPU offload: the real Trainer gives the same parameters and optimizer state as
plain data parallelism; checkpoints move between ZeRO stages and dp sizes; memory is sharded."""

from __future__ import annotations

import shutil

import pytest
import torch

from plait.config import Config, ParallelConfig
from plait.data.dataset import load_token_splits
from plait.errors import ConfigError, PlanError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.parallel import parallelize
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_model_config, tiny_run_config


def train_full_state(cfg_dict: dict, stop_at: int | None = None) -> dict | None:
    """Train per `cfg_dict`; the main rank returns losses and the gathered model/optimizer state."""
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build(dp=cfg.parallel.dp, tp=cfg.parallel.tp)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    val = None
    if stop_at is None:
        summary = trainer.fit()
        losses, val = [h["loss"] for h in summary["history"]], summary["final_val_loss"]
        norms = [h["grad_norm"] for h in summary["history"]]
    else:
        steps = [trainer.train_step() for _ in range(stop_at - trainer.step)]
        losses, norms = [s["loss"] for s in steps], [s["grad_norm"] for s in steps]
        trainer.save()
    memory = trainer.model.memory_bytes() if hasattr(trainer.model, "memory_bytes") else None
    state = trainer.model.checkpoint_state(trainer.optimizer)
    if state is None:
        return None
    return {"losses": losses, "grad_norms": norms, "val": val, "model": state["model"],
            "optim": state["optim"], "memory": memory}


def _optim_diff(a: dict, b: dict) -> float:
    assert a["state"].keys() == b["state"].keys()
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    worst = 0.0
    for idx, sa in a["state"].items():
        sb = b["state"][idx]
        assert float(sa["step"]) == float(sb["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert sa[k].shape == sb[k].shape
            worst = max(worst, (sa[k] - sb[k]).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def plain_dp(pools, tmp_path_factory):
    """Plain DP reference runs (5 steps, global batch 8) at dp=2 and dp=4, computed once."""
    tmp = tmp_path_factory.mktemp("zero_ref")
    refs = {}
    for world in (2, 4):
        cfg = tiny_run_config(tmp, train={"micro_batch_size": 8 // world, "out_dir": str(tmp / f"dp{world}")})
        refs[world] = pools(world).run(train_full_state, cfg.to_dict())[0]
    return tmp, refs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_training_matches_plain_dp(pools, plain_dp, world, stage):
    tmp, refs = plain_dp
    cfg = tiny_run_config(tmp, train={"micro_batch_size": 8 // world, "out_dir": str(tmp / f"z{stage}_{world}")},
                          parallel={"zero": stage, "bucket_mb": 0.01})
    out = pools(world).run(train_full_state, cfg.to_dict())
    assert all(r is None for r in out[1:])
    ref = refs[world]
    assert max_abs_diff(out[0]["model"], ref["model"]) < 1e-5
    assert _optim_diff(out[0]["optim"], ref["optim"]) < 1e-5
    assert out[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert out[0]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


@pytest.mark.parametrize("stage,sequence_parallel,recompute", [
    (1, False, "none"), (2, False, "none"), (3, False, "none"), (2, True, "none"), (3, False, "full")])
def test_zero_with_tensor_parallelism_matches_plain_dp(pools, plain_dp, stage, sequence_parallel, recompute):
    """dp=2 × tp=2: ZeRO shards each tp shard over its dp group (stage 3 also with recomputation,
    which gathers each block's shards again in backward); the gathered state after 5 steps equals
    plain DP at dp=2 (tp=1) on the same global batch."""
    tmp, refs = plain_dp
    cfg = tiny_run_config(tmp, train={"micro_batch_size": 4,
                                      "out_dir": str(tmp / f"tp_z{stage}{sequence_parallel}{recompute}")},
                          parallel={"zero": stage, "tp": 2, "dp": 2, "sequence_parallel": sequence_parallel,
                                    "recompute": recompute})
    out = pools(4).run(train_full_state, cfg.to_dict())
    assert all(r is None for r in out[1:])
    assert max_abs_diff(out[0]["model"], refs[2]["model"]) < 1e-5
    assert _optim_diff(out[0]["optim"], refs[2]["optim"]) < 1e-5
    assert out[0]["losses"] == pytest.approx(refs[2]["losses"], abs=1e-5)
    assert out[0]["grad_norms"] == pytest.approx(refs[2]["grad_norms"], rel=1e-5)


@pytest.mark.parametrize("stage", [1, 3])
def test_offload_matches_plain_dp(pools, plain_dp, stage):
    tmp, refs = plain_dp
    cfg = tiny_run_config(tmp, train={"micro_batch_size": 4, "out_dir": str(tmp / f"off{stage}")},
                          parallel={"zero": stage, "offload_optimizer": True})
    out = pools(2).run(train_full_state, cfg.to_dict())[0]
    assert max_abs_diff(out["model"], refs[2]["model"]) < 1e-5
    assert _optim_diff(out["optim"], refs[2]["optim"]) < 1e-5


@pytest.mark.parametrize("stage,recompute", [(3, "full"), (2, "selective")])
def test_zero_with_recomputation_matches_plain_dp(pools, plain_dp, stage, recompute):
    tmp, refs = plain_dp
    cfg = tiny_run_config(tmp, train={"micro_batch_size": 4, "out_dir": str(tmp / f"rc{stage}")},
                          parallel={"zero": stage, "recompute": recompute})
    out = pools(2).run(train_full_state, cfg.to_dict())[0]
    assert max_abs_diff(out["model"], refs[2]["model"]) < 1e-5


def test_single_process_zero3_offload_recompute_matches_plain(tmp_path):
    """On one process (one GPU: the offload use case) every piece runs without communication."""
    ref = train_full_state(tiny_run_config(tmp_path, train={"out_dir": str(tmp_path / "a")}).to_dict())
    cfg = tiny_run_config(tmp_path, train={"out_dir": str(tmp_path / "b")},
                          parallel={"zero": 3, "offload_optimizer": True, "recompute": "full"})
    out = train_full_state(cfg.to_dict())
    assert max_abs_diff(out["model"], ref["model"]) < 1e-6
    assert _optim_diff(out["optim"], ref["optim"]) < 1e-6


@pytest.mark.parametrize("world,parallel", [(2, {"compression": "powersgd", "compression_warmup": 2}),
                                            (4, {"node_size": 2})])
def test_zero1_with_reducer_hooks_matches_plain_dp(pools, plain_dp, world, parallel):
    """Stage 1 keeps the all-reduce, so compression and hierarchical hooks apply to it."""
    tmp, _ = plain_dp
    ref_cfg = tiny_run_config(tmp, train={"micro_batch_size": 8 // world, "out_dir": str(tmp / "hook_ref")},
                              parallel=parallel)
    ref = pools(world).run(train_full_state, ref_cfg.to_dict())[0]
    cfg = tiny_run_config(tmp, train={"micro_batch_size": 8 // world, "out_dir": str(tmp / "hook_z1")},
                          parallel={**parallel, "zero": 1})
    out = pools(world).run(train_full_state, cfg.to_dict())[0]
    assert max_abs_diff(out["model"], ref["model"]) < 1e-5


def test_zero_with_grad_accumulation_clipping_and_eval(pools, plain_dp):
    """ZeRO-3 with 2 micro-steps per step and a tight clip equals plain DP doing the same (dp=2),
    held-out loss included (evaluation runs the sharded model under no_grad)."""
    tmp, _ = plain_dp
    base = {"grad_clip": 0.05, "eval_interval": 5, "eval_batches": 2, "micro_batch_size": 2,
            "grad_accum": 2}
    ref_cfg = tiny_run_config(tmp, train={**base, "out_dir": str(tmp / "acc_ref")})
    ref = pools(2).run(train_full_state, ref_cfg.to_dict())[0]
    cfg = tiny_run_config(tmp, train={**base, "out_dir": str(tmp / "acc_z3")}, parallel={"zero": 3})
    out = pools(2).run(train_full_state, cfg.to_dict())[0]
    assert max_abs_diff(out["model"], ref["model"]) < 1e-5
    assert out["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert out["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert out["val"] == pytest.approx(ref["val"], abs=1e-5)


def test_checkpoint_moves_between_stages_and_layouts(pools, plain_dp):
    """Save under ZeRO-3 at dp=2 after 3 steps; resume under plain DP at dp=4, ZeRO-2 at dp=4 and
    ZeRO-1 at dp=2 × tp=2: all finish like the uninterrupted plain run."""
    tmp, refs = plain_dp
    first = tiny_run_config(tmp, train={"micro_batch_size": 4, "out_dir": str(tmp / "move")},
                            parallel={"zero": 3})
    pools(2).run(train_full_state, first.to_dict(), 3)
    for name, par, micro in (("dp", {}, 2), ("z2", {"zero": 2}, 2),
                             ("tp_z1", {"zero": 1, "dp": 2, "tp": 2}, 4)):
        run_dir = tmp / f"move_{name}"
        shutil.copytree(tmp / "move", run_dir)
        cfg = tiny_run_config(tmp, train={"micro_batch_size": micro, "out_dir": str(run_dir)},
                              checkpoint={"resume": "auto"}, parallel=par)
        out = pools(4).run(train_full_state, cfg.to_dict())[0]
        assert out["losses"] == pytest.approx(refs[2]["losses"][3:], abs=1e-5), name
        assert out["grad_norms"] == pytest.approx(refs[2]["grad_norms"][3:], rel=1e-5), name
        assert max_abs_diff(out["model"], refs[2]["model"]) < 1e-5, name


def test_sharded_bytes_shrink_with_dp(pools, plain_dp):
    """At dp=4 the sharded parts are ~1/4 of the full sizes (after a step, before zero_grad)."""
    tmp, _ = plain_dp
    n = sum(p.numel() for p in GPT(tiny_model_config()).parameters()) * 4
    mem = {}
    for stage in (1, 2, 3):
        cfg = tiny_run_config(tmp, train={"micro_batch_size": 2, "steps": 1,
                                          "out_dir": str(tmp / f"mem{stage}")}, parallel={"zero": stage})
        mem[stage] = pools(4).run(_memory_after_backward, cfg.to_dict())
    for stage, per_rank in mem.items():
        for m in per_rank:
            assert m["optim"] == pytest.approx(2 * n / 4, rel=0.02), stage  # exp_avg + exp_avg_sq
            assert m["params"] == pytest.approx(n if stage < 3 else n / 4, rel=0.02), stage
            assert m["grads"] == pytest.approx(n if stage == 1 else n / 4, rel=0.02), stage


def _memory_after_backward(cfg_dict: dict) -> dict:
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    trainer.train_step()  # creates the optimizer state
    x, y = train.batch(trainer.sampler.next_indices())
    trainer.model.forward_backward([(x, y)])
    return trainer.model.memory_bytes()


def _build(parallel: dict):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    return parallelize(GPT(tiny_model_config()), mesh, ParallelConfig(**parallel))


@pytest.mark.parametrize("parallel,error,match", [
    ({"zero": 4}, ConfigError, r"parallel.zero=4 is invalid; valid: 0, 1, 2, 3"),
    ({"zero": -1}, ConfigError, r"parallel.zero=-1"),
    ({"offload_optimizer": True}, ConfigError, r"offload_optimizer=True needs parallel.zero .*≥ 1"),
    ({"zero": 2, "compression": "bf16"}, ConfigError, r"compression='bf16' cannot be combined with parallel.zero=2"),
])
def test_bad_zero_settings_are_clear_errors(parallel, error, match):
    with pytest.raises(error, match=match):
        _build(parallel)


def test_zero3_state_dict_outside_gather_is_refused(pools):
    assert pools(2).run(_state_dict_refused) == [True, True]


def _state_dict_refused() -> bool:
    model = _build({"zero": 3})
    try:
        model.module.state_dict()
    except PlanError as exc:
        return "checkpoint_state" in str(exc)
    return False


def _zero3_collectives() -> dict:
    from plait.testing.comm_counter import CommCounter
    model = _build({"zero": 3})
    x = torch.randint(0, 256, (2, 16))
    model.module(x, x)[1].backward()  # warm-up, outside the count
    with CommCounter(model.mesh) as comm:
        model.module(x, x)[1].backward()
    return {op: v["calls"] for op, v in comm.summary().get("dp", {}).items()}


def test_zero3_gathers_each_block_twice_and_reduces_once(pools):
    """Per step: the root and each block gathered for forward, each block again for backward;
    one reduce-scatter per block and root, one all-reduce of the used-flags."""
    n_blocks = tiny_model_config().n_layer
    for calls in pools(2).run(_zero3_collectives):
        assert calls == {"all_gather_single": 1 + 2 * n_blocks, "reduce_scatter_single": n_blocks + 1,
                         "all_reduce": 1}
