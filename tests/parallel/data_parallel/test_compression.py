"""Gradient compression hooks: bytes on the wire, exact used-flags, PowerSGD and top-k mechanics,
held-out loss close to uncompressed training, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from plait.config import Config, ParallelConfig
from plait.data.dataset import load_token_splits
from plait.errors import ConfigError, PlanError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.testing.comm_counter import CommCounter
from plait.parallel.data_parallel.hooks import CountingAllReduce
from plait.parallel.data_parallel.compression import PowerSGDHook, TopKHook, build_compression_hook
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel import parallelize
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_model_config, tiny_run_config

# The GPT of examples/tiny_gpt.toml.
TINY_GPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)


def _hook(kind: str, model: nn.Module, dp: int, **cfg):
    if kind == "none":
        return CountingAllReduce()
    return build_compression_hook(ParallelConfig(compression=kind, compression_warmup=0, **cfg), model, dp)


def _wire_bytes(kind: str) -> dict:
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(tiny_model_config(**TINY_GPT))
    hook = _hook(kind, model, mesh.dp_size)
    reducer = GradientReducer(model, mesh.dp_group, comm_hook=hook)
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(mesh.rank))
    with CommCounter(mesh) as comm:
        model(x[:, :-1], x[:, 1:])[1].backward()
    reducer.remove()
    return {"wire": hook.stats.wire, "payload": hook.stats.payload, "counted": comm.bytes("dp")}


def test_bytes_on_the_wire_shrink(pools):
    sent = {k: pools(2).run(_wire_bytes, k)[0] for k in ("none", "bf16", "fp16", "powersgd", "topk")}
    for s in sent.values():  # the hooks' own count agrees with what torch.distributed was handed
        assert s["payload"] == s["counted"]
    ratio = {k: sent["none"]["wire"] / s["wire"] for k, s in sent.items()}
    assert ratio["bf16"] >= 2.0 and ratio["fp16"] >= 2.0
    assert ratio["powersgd"] >= 10.0  # rank 4 on the 128-wide GPT: about 20×
    assert ratio["topk"] >= 10.0  # 1% of the values plus their indices


class _Branchy(nn.Module):
    """`a` is used on every rank, `b` only on rank 0, `c` never (as in test_reducer.py)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x, use_b: bool):
        y = self.a(x)
        return self.b(y) if use_b else y


def _unused(kind: str, extra: dict):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = _Branchy()
    reducer = GradientReducer(model, mesh.dp_group, bucket_mb=1e-4, comm_hook=_hook(kind, model, 2, **extra))
    x = torch.ones(2, 8) * (mesh.rank + 1)
    model(x, use_b=mesh.rank == 0).sum().backward()
    reducer.remove()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind,extra,tol", [
    ("bf16", {}, 1e-2), ("fp16", {}, 1e-3), ("topk", {"topk_ratio": 1.0}, 1e-6),
    ("powersgd", {"powersgd_rank": 1}, None),
])
def test_used_flags_stay_exact(pools, kind, extra, tol):
    r0, r1 = pools(2).run(_unused, kind, extra)
    torch.manual_seed(0)
    model = _Branchy()
    (model(torch.ones(2, 8), True).sum() + model(torch.ones(2, 8) * 2, False).sum()).backward()
    for name, p in model.named_parameters():
        assert (r0[name] is None) == (p.grad is None) == (r1[name] is None), name
        if p.grad is not None and tol is not None:
            assert torch.allclose(r0[name], p.grad / 2, rtol=tol, atol=tol), name


def _powersgd_low_rank_sum() -> float:
    """Each rank's gradient is rank 1 (one sample); their sum is rank 2: rank-2 PowerSGD is exact."""
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = nn.Linear(64, 48, bias=False)
    reducer = GradientReducer(model, mesh.dp_group, comm_hook=PowerSGDHook(2))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(10 + mesh.rank))
    model(x).pow(2).sum().backward()
    reducer.remove()
    exact = torch.zeros(48, 64)
    for r in range(mesh.dp_size):
        xr = torch.randn(1, 64, generator=torch.Generator().manual_seed(10 + r))
        exact += 2 * (model.weight.detach() @ xr.t()) @ xr
    return (model.weight.grad - exact / mesh.dp_size).abs().max().item()


def test_powersgd_is_exact_on_low_rank_sums(pools):
    assert max(pools(2).run(_powersgd_low_rank_sum)) < 1e-5


def _topk_error_feedback(ratio: float):
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = nn.Linear(32, 16)
    hook = TopKHook(ratio)
    reducer = GradientReducer(model, mesh.dp_group, comm_hook=hook)
    captured = {}
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(mesh.rank))
    loss = model(x).pow(2).sum()
    local = torch.autograd.grad(loss, [p for p in reversed(list(model.parameters()))], retain_graph=True)
    captured["local"] = torch.cat([g.reshape(-1) for g in local])  # bucket order: reversed params
    loss.backward()
    reducer.remove()
    return captured["local"], hook.error["0"]


def test_topk_keeps_what_it_did_not_send(pools):
    local, error = pools(2).run(_topk_error_feedback, 0.1)[0]
    sent = local - error
    k = -(-local.numel() // 10)
    assert int((sent != 0).sum()) == k
    assert sent[sent != 0].abs().min() >= error.abs().max()  # the largest k were sent


def _final_val_loss(cfg_dict: dict) -> float:
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    return Trainer(cfg, mesh, train, val).fit()["final_val_loss"]


def test_held_out_loss_close_to_uncompressed(pools, tmp_path):
    """60 steps at dp=2 on the generated corpus (128-wide GPT, 2 blocks): bf16 and PowerSGD
    rank 4 end within 5% of uncompressed training; top-k (1%) still learns."""
    def cfg(kind: str) -> dict:
        return tiny_run_config(tmp_path, model={"n_embd": 128, "n_head": 4},
                               train={"steps": 60, "eval_interval": 60, "warmup_steps": 5,
                                      "out_dir": str(tmp_path / kind)},
                               parallel={"compression": kind}).to_dict()
    loss = {k: pools(2).run(_final_val_loss, cfg(k))[0] for k in ("none", "bf16", "powersgd", "topk")}
    assert loss["bf16"] <= 1.05 * loss["none"]
    assert loss["powersgd"] <= 1.05 * loss["none"]
    assert loss["topk"] < 0.6 * 5.55  # ln(256) ≈ 5.55 at the start


def test_bad_compression_settings_are_clear_errors():
    model = GPT(tiny_model_config())
    with pytest.raises(ConfigError, match=r"powersgd_rank=17 exceeds .* 'pos_emb.weight' .*16×32.* 1\.\.16"):
        build_compression_hook(ParallelConfig(compression="powersgd", powersgd_rank=17), model, 2)
    with pytest.raises(ConfigError, match=r"parallel.compression='zip' is invalid; valid: none, bf16"):
        parallelize(model, ParallelMesh.single(), ParallelConfig(compression="zip"))
    for bad, match in (({"zero": 3}, "cannot be combined with parallel.zero=3"),
                       ({"reducer": "naive"}, "cannot be combined with parallel.reducer='naive'"),
                       ({"node_size": 2}, "cannot be combined")):
        with pytest.raises(ConfigError, match=match):
            parallelize(model, ParallelMesh.single(), ParallelConfig(compression="bf16", **bad))


def _with_tp() -> str:
    mesh = ParallelMesh.build(tp=2)
    torch.manual_seed(0)
    try:
        parallelize(GPT(tiny_model_config()), mesh, ParallelConfig(tp=2, compression="powersgd"))
    except ConfigError as exc:
        return str(exc)
    return ""


def test_compression_with_tensor_parallelism_is_refused(pools):
    assert all("compression" in msg for msg in pools(2).run(_with_tp))


@pytest.mark.parametrize("field,value,match", [
    ("powersgd_rank", 0, r"parallel.powersgd_rank=0 must be ≥ 1"),
    ("topk_ratio", 0.0, r"parallel.topk_ratio=0.0 must be in \(0, 1\]"),
    ("topk_ratio", 1.5, r"parallel.topk_ratio=1.5 must be in \(0, 1\]"),
    ("compression_warmup", -1, r"parallel.compression_warmup=-1 must be ≥ 0"),
])
def test_bad_compression_fields(tmp_path, field, value, match):
    from plait.config import validate
    with pytest.raises(ConfigError, match=match):
        validate(tiny_run_config(tmp_path, parallel={field: value}))


def _train(cfg_dict: dict, stop_at: int | None = None) -> dict:
    """Train per `cfg_dict` (to the end, or to `stop_at` and checkpoint); report what resume needs."""
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    start_seen = trainer.model.reducer.comm_hook.warmup.seen  # after any resume
    if stop_at is not None:
        while trainer.step < stop_at:
            trainer.train_step()
        trainer.save()
        return {}
    summary = trainer.fit()
    return {"losses": [h["loss"] for h in summary["history"]], "start_seen": start_seen,
            "params": {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}}


@pytest.mark.parametrize("kind", ["powersgd", "topk"])
def test_resume_restores_error_feedback_bit_exact(pools, tmp_path, kind):
    """6 steps straight vs 4, checkpoint, resume to 6 (compression from step 3): the resumed run
    goes on with each rank's error feedback, warm start and warm-up count, bit for bit."""
    def cfg(name: str, **extra) -> dict:
        return tiny_run_config(tmp_path, train={"steps": 6, "out_dir": str(tmp_path / name)},
                               parallel={"compression": kind, "compression_warmup": 2,
                                         "powersgd_rank": 2, "topk_ratio": 0.1}, **extra).to_dict()
    full = pools(2).run(_train, cfg("straight"))[0]
    pools(2).run(_train, cfg("cut"), 4)
    resumed = pools(2).run(_train, cfg("cut", checkpoint={"resume": "auto"}))
    assert [r["start_seen"] for r in resumed] == [4, 4]
    assert resumed[0]["losses"] == full["losses"][4:]
    assert max_abs_diff(resumed[0]["params"], full["params"]) == 0.0


def test_compression_state_that_does_not_fit_restarts_the_warm_up(pools, tmp_path):
    """Saved with one bucket size, resumed with another: the per-bucket state cannot apply, so the
    run warns and compresses afresh (warm-up first) instead of failing or misapplying it."""
    def cfg(**parallel) -> dict:
        return tiny_run_config(tmp_path, train={"steps": 6, "out_dir": str(tmp_path / "run")},
                               parallel={"compression": "topk", "compression_warmup": 2, **parallel},
                               checkpoint={"resume": "auto"}).to_dict()
    pools(2).run(_train, cfg(bucket_mb=25.0), 4)
    resumed = pools(2).run(_train, cfg(bucket_mb=0.001))  # many small buckets now
    assert [r["start_seen"] for r in resumed] == [0, 0]
    assert len(resumed[0]["losses"]) == 2


def _damaged(good: dict) -> list[dict]:
    """Ways a saved PowerSGD state can fail to fit: another kind or rank, a bad count, a
    non-mapping, a slot this run lacks, a wrong shape."""
    k = next(iter(good["error"]))
    return [{**good, "kind": "topk"}, {**good, "rank": 3}, {**good, "seen": "four"},
            {**good, "q": [1, 2]}, {**good, "error": {"99/0": torch.zeros(2)}},
            {**good, "error": {**good["error"], k: good["error"][k][:1]}}]


def _fits() -> list[bool]:
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    mesh = ParallelMesh.build()
    hook = PowerSGDHook(rank=2)
    reducer = GradientReducer(model, mesh.dp_group, comm_hook=hook)
    x = torch.randint(0, 256, (2, 17))
    model(x[:, :-1], x[:, 1:])[1].backward()
    reducer.remove()
    good = hook.state_dict()
    return [hook.fits(good, reducer.buckets)] + [hook.fits(s, reducer.buckets) for s in _damaged(good)]


def test_damaged_compression_state_is_recognised(pools):
    assert pools(2).run(_fits)[0] == [True] + [False] * 6
