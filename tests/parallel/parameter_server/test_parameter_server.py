"""Parameter server: sync parity with one process and with all-reduce DP, async/ssp accuracy on
the digits, the staleness bound, exact resume, sharding, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import Config, load_config, validate
from plait.errors import CheckpointError, ConfigError, PlanError
from plait.models import GPT
from plait.models.mlp import MLPClassifier
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel.parameter_server import FlatLayout, ParameterServer, PSLayout, PSOptions, PSWorker
from plait.parallel.parameter_server.run import WorkerHooks, run_ps
from tests.helpers import max_abs_diff, tiny_model_config

STEPS = 5
# Adam turns rounding-level differences in near-zero gradient entries into lr-sized steps: on the
# GPT, even one process splitting its batch in two moves ~2e-5 away from the unsplit batch at
# lr 1e-3 without clipping. So Adam runs at a small lr, with a clip that binds.
LR = {"sgd": 0.05, "adam": 1e-3}


# --- sync parity ------------------------------------------------------------------------------


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MLPClassifier(64, 32, 1, 10) if kind == "mlp" else GPT(tiny_model_config())


def _batches(kind: str, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return [(torch.rand(global_batch, 64, generator=g), torch.randint(0, 10, (global_batch,), generator=g))
                for _ in range(STEPS)]
    out = []
    for _ in range(STEPS):
        data = torch.randint(0, 256, (global_batch, 17), generator=g)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def _options(optimizer: str, clip: float) -> PSOptions:
    return PSOptions(mode="sync", optimizer=optimizer, lr=LR[optimizer], momentum=0.9, weight_decay=0.1,
                     betas=(0.9, 0.95), grad_clip=clip)


def _torch_optimizer(model: nn.Module, opts: PSOptions) -> torch.optim.Optimizer:
    """What one process would use: decay on ≥2-D weights only, as the servers do."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if opts.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas)
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)


def _train_local(model, opts, batches, part=slice(None), reducer=None) -> dict[str, torch.Tensor]:
    opt = _torch_optimizer(model, opts)
    for x, y in batches:
        model(x[part], y[part])[1].backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), opts.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if reducer is not None:
        reducer.remove()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ps_and_dp(kind: str, optimizer: str, clip: float, n_servers: int, global_batch: int):
    """On every pool rank: sync PS training, then all-reduce DP over the same workers."""
    layout = PSLayout.build(n_servers)
    opts = _options(optimizer, clip)
    batches = _batches(kind, global_batch)
    per = global_batch // layout.n_workers
    part = slice(layout.worker_index * per, (layout.worker_index + 1) * per)
    model = _model(kind)
    ps_params = None
    if layout.is_server:
        ParameterServer(model, layout, opts).serve()
    else:
        worker = PSWorker(model, layout, opts)
        assert worker.start() == 0
        for x, y in batches:
            model(x[part], y[part])[1].backward()
            worker.push_pull()
        worker.finish()
        ps_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    group = dist.new_group(layout.workers)  # collective: every rank makes it
    if layout.is_server:
        return None
    dp_model = _model(kind)
    reducer = GradientReducer(dp_model, group, bucket_mb=0.01)
    return {"ps": ps_params, "dp": _train_local(dp_model, opts, batches, part, reducer)}


@pytest.mark.parametrize("kind,optimizer,clip,servers,workers", [
    ("mlp", "sgd", 0.0, 1, 3),
    ("gpt", "adam", 0.05, 2, 2),  # the clip binds: the norm is reduced across both servers
    ("gpt", "sgd", 0.0, 1, 3),
])
def test_sync_matches_one_process_and_allreduce(pools, kind, optimizer, clip, servers, workers):
    global_batch = 6 * workers
    ref = _train_local(_model(kind), _options(optimizer, clip), _batches(kind, global_batch))
    results = pools(servers + workers).run(_ps_and_dp, kind, optimizer, clip, servers, global_batch)
    assert results[:servers] == [None] * servers
    start = _model(kind).state_dict()
    assert max_abs_diff(ref, start) > 1e-3  # the 5 steps moved the parameters
    for r in results[servers:]:
        assert max_abs_diff(r["ps"], ref) < 1e-5
        assert max_abs_diff(r["ps"], r["dp"]) < 1e-5
        assert max_abs_diff(r["ps"], results[servers]["ps"]) == 0.0  # every worker holds the same


# --- digits runs through plait.parallel.parameter_server.run -----------------------------------------------------


def _digits_config(tmp_path: Path, mode: str, servers: int, **train) -> Config:
    raw = {
        "model": {"arch": "mlp", "n_layer": 1, "n_embd": 32},
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "train": {"steps": 120, "micro_batch_size": 32, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 5,
                  "weight_decay": 0.0, "grad_clip": 0.0, "eval_interval": 0, "log_interval": 1,
                  "seed": 0, "device": "cpu", "out_dir": str(tmp_path / mode), **train},
        "checkpoint": {"resume": "none"},
        "parallel": {"ps": {"servers": servers, "mode": mode, "staleness": 1, "worker_timeout_s": 60.0}},
    }
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg


def _records(out_dir: str, role: str, rank: int) -> list[dict]:
    path = Path(out_dir) / "ps" / f"{role}_{rank}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(cfg_dict: dict, slow_rank: int = -1, delay_s: float = 0.0):
    hooks = WorkerHooks(before_step=_Sleeper(slow_rank, delay_s))
    return run_ps(Config.from_dict(cfg_dict), hooks)


class _Sleeper:
    """Slows one worker down, as a loaded machine would."""

    def __init__(self, rank: int, delay_s: float):
        self.rank, self.delay_s = rank, delay_s

    def __call__(self, rank: int, step: int) -> None:
        if rank == self.rank:
            import time
            time.sleep(self.delay_s)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_learn_the_digits(pools, tmp_path, mode):
    """Two servers, two workers, 120 steps each: ≥ 90% on the held-out digits."""
    cfg = _digits_config(tmp_path, mode, servers=2)
    results = pools(4).run(_run, cfg.to_dict())
    servers, workers = results[:2], results[2:]
    for w in workers:
        assert w["status"] == "finished" and w["steps"] == 120
        assert w["val_accuracy"] >= 0.90, w
    assert workers[0]["val_accuracy"] == workers[1]["val_accuracy"]  # both hold the final params
    # Metrics: every pushed gradient is an update on each server, and its bytes arrived there.
    shard_bytes = [s["shard_numel"] * 4 for s in servers]
    for s, nbytes in zip(servers, shard_bytes):
        assert s["updates"] == 240 and s["dead_workers"] == []
        assert s["bytes_received"] >= 240 * nbytes
    for rank in (2, 3):
        recs = [r for r in _records(cfg.train.out_dir, "worker", rank) if "step" in r]
        assert [r["step"] for r in recs] == list(range(1, 121))
        assert all({"staleness", "ahead", "wait_s", "loss"} <= r.keys() for r in recs)
    end = _records(cfg.train.out_dir, "server", 0)[-1]
    assert end["event"] == "end" and end["updates"] == 240


def test_ssp_never_exceeds_its_staleness_bound(pools, tmp_path):
    """One slow worker of three; with s = 1 the fast ones wait for it, without a bound they run off.

    Besides the servers' own count, the bound is checked from the workers' timestamps: a worker
    starts step k only after every other worker began pushing its step k − s − 1.
    """
    s, steps = 1, 30
    out = {}
    for mode in ("ssp", "async"):
        cfg = _digits_config(tmp_path, mode, servers=1, steps=steps)
        out[mode] = pools(4).run(_run, cfg.to_dict(), 3, 0.02)
        out[mode + "_dir"] = cfg.train.out_dir
    ssp_workers = out["ssp"][1:]
    assert all(w["status"] == "finished" for w in ssp_workers)
    assert max(w["max_ahead"] for w in ssp_workers) == s  # the bound is reached ...
    assert out["ssp"][0]["max_ahead"] <= s  # ... and never exceeded
    assert all(w["bound_wait_s"] > 0 for w in ssp_workers[:2])  # the fast workers were held back
    assert max(w["max_ahead"] for w in out["async"][1:]) > s + 2  # no bound: they run ahead
    records = {r: [x for x in _records(out["ssp_dir"], "worker", r) if "step" in x] for r in (1, 2, 3)}
    push_start = {r: {x["step"] - 1: x["time"] - x["wait_s"] for x in recs} for r, recs in records.items()}
    step_start = {r: {x["step"]: x["time"] for x in recs} for r, recs in records.items()}
    assert all(x["ahead"] <= s for recs in records.values() for x in recs)
    checked = 0
    for w in records:
        for k, t in step_start[w].items():
            for u in records:
                if u != w and 0 <= k - s - 1 < steps:
                    assert push_start[u][k - s - 1] < t, (w, k, u)
                    checked += 1
    assert checked > 100


def _constant_lr_config(tmp_path: Path, steps: int, resume: str, out: str) -> Config:
    cfg = _digits_config(tmp_path, "sync", servers=2, steps=steps, warmup_steps=0, min_lr=1e-2,
                         out_dir=str(tmp_path / out))
    cfg.checkpoint.resume = resume
    return cfg


def _final_params(cfg_dict: dict):
    """Run, then return the final shard of each server (rank order)."""
    summary = run_ps(Config.from_dict(cfg_dict))
    if summary["role"] != "server":
        return None
    from plait.train.checkpoint import load_checkpoint
    return load_checkpoint(summary["checkpoint"])["model"]["shard"]


def test_sync_resume_from_server_checkpoints_is_exact(pools, tmp_path):
    """6 steps straight vs 3 steps, then a restarted job that resumes to 6: identical shards."""
    straight = pools(4).run(_final_params, _constant_lr_config(tmp_path, 6, "none", "a").to_dict())
    pools(4).run(_final_params, _constant_lr_config(tmp_path, 3, "none", "b").to_dict())
    resumed_cfg = _constant_lr_config(tmp_path, 6, "auto", "b")
    resumed = pools(4).run(_final_params, resumed_cfg.to_dict())
    for a, b in zip(straight[:2], resumed[:2]):
        assert torch.equal(a, b)
    assert _steps_of_last_run(resumed_cfg.train.out_dir, 2) == [4, 5, 6]  # continued after step 3


def _steps_of_last_run(out_dir: str, rank: int) -> list[int]:
    records = _records(out_dir, "worker", rank)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    return [r["step"] for r in records[last_start:] if "step" in r]


def test_async_job_restarted_from_server_checkpoints_continues(pools, tmp_path):
    """Each async server resumes its own shard, version and the workers' clocks."""
    first = _digits_config(tmp_path, "async", servers=2, steps=8)
    pools(4).run(_run, first.to_dict())
    again = _digits_config(tmp_path, "async", servers=2, steps=12)
    again.checkpoint.resume = "auto"
    servers = pools(4).run(_run, again.to_dict())[:2]
    assert [s["version"] for s in servers] == [24, 24] and [s["updates"] for s in servers] == [8, 8]
    assert _steps_of_last_run(again.train.out_dir, 2) == [9, 10, 11, 12]


# --- sharding and bad input (one process) ------------------------------------------------------


def test_shards_are_balanced_and_cover_every_parameter():
    model = GPT(tiny_model_config())
    flat = FlatLayout.of(model)
    assert flat.numel == sum(p.numel() for p in model.parameters())  # the tied head counted once
    for n in (1, 2, 3, 7):
        bounds = flat.shard_bounds(n)
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == flat.numel
        assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
        covered = sum(p.stop - p.start for a, b in bounds for p in flat.pieces(a, b))
        assert covered == flat.numel
    with pytest.raises(PlanError, match="parallel.ps.servers=3"):
        FlatLayout.of(nn.Linear(1, 1)).shard_bounds(3)


def test_bad_input_fails_before_start(tmp_path):
    cfg = _digits_config(tmp_path, "async", servers=2)
    with pytest.raises(ConfigError, match=r"parallel\.ps\.servers=2 leaves no worker among --nproc 2"):
        validate(cfg, 2)
    with pytest.raises(ConfigError, match="at most 2 servers"):
        PSLayout(world_size=3, n_servers=3, rank=0)
    with pytest.raises(ConfigError, match=r"parallel\.ps\.mode='bulk' is invalid; valid: sync, async, ssp"):
        load_config(None, ["parallel.ps.servers=1", "parallel.ps.mode=bulk"])
    with pytest.raises(ConfigError, match=r"parallel\.ps\.mode='bulk'"):
        PSOptions(mode="bulk")
    with pytest.raises(ConfigError, match=r"parallel\.ps\.optimizer"):
        load_config(None, ["parallel.ps.servers=1", "parallel.ps.optimizer=lamb"])
    with pytest.raises(ConfigError, match=r"parallel\.tp=2 cannot be combined"):
        load_config(None, ["parallel.ps.servers=1", "parallel.tp=2"])
    layout = PSLayout(world_size=3, n_servers=1, rank=0)
    for model in (nn.ReLU(), nn.Linear(2, 2).requires_grad_(False)):
        with pytest.raises(PlanError, match="no trainable parameters"):
            ParameterServer(model, layout, PSOptions())
        with pytest.raises(PlanError, match="no trainable parameters"):
            PSWorker(model, PSLayout(world_size=3, n_servers=1, rank=1), PSOptions())


def test_checkpoint_of_another_layout_is_refused():
    model = MLPClassifier(64, 16, 1, 10)
    one = ParameterServer(model, PSLayout(world_size=3, n_servers=1, rank=0), PSOptions())
    two = ParameterServer(model, PSLayout(world_size=4, n_servers=2, rank=0), PSOptions())
    with pytest.raises(CheckpointError, match="parallel.ps.servers"):
        two.load_state_dict(one.state_dict())
