"""Hybrid dp × tp training through the real Trainer equals one process; checkpoints reshard.

Every rank's parameter shards after 5 steps are compared with the matching slice of the model
trained in one process on the same global batch (clipping active, AdamW), within 1e-5.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.parallel.tensor_parallel.split import TensorParallel
from plait.parallel.tensor_parallel.shard import shard_spec
from plait.train.trainer import Trainer
from tests.helpers import tiny_run_config

GLOBAL_BATCH = 8
TOL = 1e-5


def _trainer(cfg_dict: dict, alone: bool = False) -> Trainer:
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.single() if alone else ParallelMesh.build(dp=cfg.parallel.dp, tp=cfg.parallel.tp)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    return Trainer(cfg, mesh, train, val)


def _report(trainer: Trainer, history: list[dict]) -> dict:
    """This rank's parameters (shards where split) with their specs, and the loss and gradient-norm
    histories (the norm sees a gradient off by a constant factor, which AdamW hides in the weights)."""
    model = trainer.model.module
    named = dict(model.named_parameters(remove_duplicate=False))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    specs = {k: shard_spec(named[k]) if k in named else None for k in state}
    return {"params": state, "specs": specs, "losses": [h["loss"] for h in history],
            "grad_norms": [h["grad_norm"] for h in history], "step": trainer.step,
            "tp_rank": trainer.mesh.tp_rank, "tp": trainer.mesh.tp_size,
            "tensor_parallel": isinstance(trainer.model.tensor, TensorParallel)}


def train_and_report(cfg_dict: dict, alone: bool = False) -> dict:
    trainer = _trainer(cfg_dict, alone)
    summary = trainer.fit()
    return _report(trainer, summary["history"])


def train_until(cfg_dict: dict, stop_at: int) -> int:
    trainer = _trainer(cfg_dict)
    while trainer.step < stop_at:
        trainer.train_step()
    trainer.save()
    return trainer.step


def _max_shard_diff(result: dict, ref: dict) -> float:
    """Largest difference between a rank's shards and the same slices of the full reference."""
    worst = 0.0
    assert result["params"].keys() == ref["params"].keys()
    for key, local in result["params"].items():
        full = ref["params"][key]
        spec = result["specs"][key]
        expected = full if spec is None else spec.shard(full, result["tp_rank"], result["tp"])
        worst = max(worst, (local - expected).abs().max().item())
    return worst


def _config(tmp_path, name: str, dp: int = 1, tp: int = 1, sp: bool = False, vocab: int = 256,
            recompute: str = "none", **train):
    micro = GLOBAL_BATCH // dp
    return tiny_run_config(
        tmp_path, model={"n_head": 4, "vocab_size": vocab},
        train={"micro_batch_size": micro, "out_dir": str(tmp_path / name), **train},
        parallel={"dp": dp, "tp": tp, "sequence_parallel": sp, "recompute": recompute})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs, one per vocabulary size, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("tp_ref")
    return {vocab: train_and_report(_config(tmp, f"ref{vocab}", vocab=vocab).to_dict(), alone=True)
            for vocab in (256, 257)}


@pytest.mark.parametrize("dp,tp", [(1, 2), (1, 4), (2, 2)])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_dp_tp_training_matches_one_process(pools, tmp_path, reference, dp, tp, sp):
    ref = reference[256]
    cfg = _config(tmp_path, "run", dp=dp, tp=tp, sp=sp)
    results = pools(dp * tp).run(train_and_report, cfg.to_dict())
    for r in results:
        assert r["tensor_parallel"] and r["step"] == 5
        assert _max_shard_diff(r, ref) < TOL
        assert r["losses"] == pytest.approx(ref["losses"], abs=TOL)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=TOL)
    # The dp replicas of one shard are identical, bit for bit.
    for r in results[tp:]:
        twin = results[r["tp_rank"]]
        assert all(torch.equal(v, twin["params"][k]) for k, v in r["params"].items())


@pytest.mark.parametrize("dp,tp,sp,recompute", [(1, 2, False, "full"), (2, 2, True, "selective")])
def test_recomputation_under_tp_trains_like_one_process(pools, tmp_path, reference, dp, tp, sp, recompute):
    ref = reference[256]
    cfg = _config(tmp_path, "rc", dp=dp, tp=tp, sp=sp, recompute=recompute)
    for r in pools(dp * tp).run(train_and_report, cfg.to_dict()):
        assert r["step"] == 5
        assert _max_shard_diff(r, ref) < TOL
        assert r["losses"] == pytest.approx(ref["losses"], abs=TOL)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=TOL)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_not_divisible_by_tp_trains_like_one_process(pools, tmp_path, reference, tp):
    ref = reference[257]
    results = pools(tp).run(train_and_report, _config(tmp_path, "v", tp=tp, vocab=257).to_dict())
    for r in results:
        assert r["losses"] == pytest.approx(ref["losses"], abs=TOL)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=TOL)
        # Looser than the loss: a weight whose first gradient is ~1e-9 (a dead GELU unit) gets an
        # AdamW step of g/(|g| + eps), which turns fp32 rounding of g into ~1e-5 of the weight.
        assert _max_shard_diff(r, ref) < 1e-4
    # The padded rows stay out of the shards' state: the last rank holds fewer real rows.
    last = results[-1]
    assert last["params"]["tok_emb.weight"].shape[0] == -(-257 // tp)


def test_checkpoint_from_tp2_resumes_at_tp1_and_tp4(pools, tmp_path, reference):
    """Save at tp=2 after 3 steps; continue to 5 at tp=1 and at tp=4 (dp=1): same as one process."""
    ref = reference[256]
    pools(2).run(train_until, _config(tmp_path, "tp2", tp=2).to_dict(), 3)
    ckpts = sorted((tmp_path / "tp2" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000003"]
    for tp, runner in ((1, None), (4, pools(4))):
        out_dir = tmp_path / f"resume_tp{tp}"
        shutil.copytree(tmp_path / "tp2", out_dir)
        cfg = _config(tmp_path, out_dir.name, tp=tp)
        cfg.checkpoint.resume = "auto"
        if runner is None:
            out = [train_and_report(cfg.to_dict(), alone=True)]
        else:
            out = runner.run(train_and_report, cfg.to_dict())
        for r in out:
            assert r["step"] == 5
            assert r["losses"] == pytest.approx(ref["losses"][3:], abs=TOL)
            assert r["grad_norms"] == pytest.approx(ref["grad_norms"][3:], rel=TOL)
            assert _max_shard_diff(r, ref) < TOL


def _clip(max_norm: float) -> tuple[float, float]:
    """Grad norm reported by the tp model vs torch's clip_grad_norm_ on the plain model."""
    from plait.config import ParallelConfig
    from plait.models import GPT
    from plait.parallel import parallelize
    from tests.helpers import tiny_model_config

    mesh = ParallelMesh.build(tp=dist.get_world_size())
    data = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = GPT(tiny_model_config(n_head=4))
    plain(data[:, :-1], data[:, 1:])[1].backward()
    ref = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm).item()
    torch.manual_seed(0)
    model = parallelize(GPT(tiny_model_config(n_head=4)), mesh,
                        ParallelConfig(tp=mesh.tp_size, sequence_parallel=True))
    model.forward_backward([(data[:, :-1], data[:, 1:])])
    ours = model.clip_grad_norm_(max_norm).item()
    worst = 0.0
    plain_grads = dict(plain.named_parameters())
    for name, p in model.module.named_parameters():
        spec = shard_spec(p)
        g = plain_grads[name].grad
        expected = g if spec is None else spec.shard(g, mesh.tp_rank, mesh.tp_size)
        worst = max(worst, (p.grad - expected).abs().max().item())
    return abs(ours - ref), worst


@pytest.mark.parametrize("tp", [2, 4])
def test_grad_norm_clipping_counts_every_parameter_once(pools, tp):
    for norm_diff, grad_diff in pools(tp).run(_clip, 0.05):
        assert norm_diff < 1e-6
        assert grad_diff < 1e-6


def _train_steps(cfg_dict: dict, stop_at: int) -> dict:
    trainer = _trainer(cfg_dict)
    history = []
    while trainer.step < stop_at:
        history.append(trainer.train_step())
    if cfg_dict["checkpoint"]["resume"] == "none":
        trainer.save()
    return _report(trainer, history)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_dropout_keeps_tp_replicas_identical_and_resumes_bit_exact(pools, tmp_path, sp):
    """With dropout, replicated activations must get one mask on all tp ranks (else the copies
    of norms and biases drift apart); a resumed run must draw the same masks as a straight one."""
    def cfg(name, resume="none"):
        c = _config(tmp_path, name, tp=2, sp=sp)
        c.model.dropout = 0.1
        c.checkpoint.resume = resume
        return c.to_dict()

    straight = pools(2).run(_train_steps, cfg("straight"), 5)
    a, b = straight
    for key, spec in a["specs"].items():
        if spec is None:  # held whole by both tp ranks
            assert torch.equal(a["params"][key], b["params"][key]), key
    pools(2).run(_train_steps, cfg("cut"), 3)
    resumed = pools(2).run(_train_steps, cfg("cut", resume="auto"), 5)
    for r, s in zip(resumed, straight):
        assert r["losses"] == s["losses"][3:]
        assert all(torch.equal(v, s["params"][k]) for k, v in r["params"].items())


def _load_mismatched() -> str:
    from plait.config import ParallelConfig, TrainConfig
    from plait.errors import CheckpointError
    from plait.models import GPT
    from plait.parallel import parallelize
    from tests.helpers import tiny_model_config

    mesh = ParallelMesh.build(tp=dist.get_world_size())
    model = parallelize(GPT(tiny_model_config(vocab_size=300)), mesh, ParallelConfig(tp=mesh.tp_size))
    optimizer = model.build_optimizer(TrainConfig())
    other = GPT(tiny_model_config(vocab_size=256))
    try:
        model.load_checkpoint_state(optimizer, {"model": other.state_dict(), "optim": optimizer.state_dict()})
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_checkpoint_of_another_vocabulary_is_refused(pools):
    for msg in pools(2).run(_load_mismatched):
        assert "tok_emb.weight has shape (256, 32); this model expects size 300 in dim 0" in msg
