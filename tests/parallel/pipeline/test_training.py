"""Pipeline parallelism through the real Trainer: parity with one process, tied weights, stashed
activations, bubble metrics, dp × pp, and checkpoints that load at another pipeline size."""

from __future__ import annotations

import pytest
import torch

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.parallel.pipeline import theoretical_bubble
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config

SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved")
GLOBAL_BATCH = 8
STEPS = 5


def _run(cfg_dict: dict, world_mesh: bool = True, stop_at: int | None = None) -> dict:
    """Train (to `stop_at` and save, or through fit()); report what the tests compare."""
    cfg = Config.from_dict(cfg_dict)
    p = cfg.parallel
    mesh = ParallelMesh.build(dp=p.dp, pp=p.pp, tp=p.tp) if world_mesh else ParallelMesh.single()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    if stop_at is not None:
        while trainer.step < stop_at:
            trainer.train_step()
        trainer.save()
        return {"step": trainer.step}
    summary = trainer.fit()
    full = trainer.model.checkpoint_state(trainer.optimizer)  # collective; full state on rank 0
    history = summary["history"]
    return {
        "params": full["model"] if full else None,
        "stage": {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()},
        "losses": [h["loss"] for h in history],
        "grad_norms": [h["grad_norm"] for h in history],
        "val": summary["final_val_loss"],
        "metrics": {k: v for k, v in history[-1].items() if k.startswith(("bubble", "pp_"))},
    }


def _run_many(jobs: list[tuple[dict, dict]]) -> list[dict]:
    """Several runs in one pool call: [(config dict, keyword arguments of _run)]."""
    return [_run(c, **kw) for c, kw in jobs]


def _config(tmp_path, name: str, n_layer: int, m: int = 1, **parallel) -> Config:
    return tiny_run_config(
        tmp_path, model={"n_layer": n_layer},
        train={"micro_batch_size": GLOBAL_BATCH // (m * max(1, parallel.get("dp", 1))), "grad_accum": m,
               "steps": STEPS, "eval_interval": STEPS, "eval_batches": 2, "out_dir": str(tmp_path / name)},
        parallel=parallel)


def _cases(pp: int) -> list[tuple[str, int, int]]:
    """(schedule, m, v) for a pipeline of pp stages; interleaved runs v = 2 chunks per rank."""
    return [(s, m, 2 if s == "interleaved" else 1) for s in SCHEDULES for m in (4, 8)]


def _n_layer(pp: int, v: int) -> int:
    return 8 if pp * v > 4 else 4  # interleaved at pp=4 needs pp·v = 8 blocks


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{(n_layer, m): one process on the same global batch, in m micro-batches of 8/m}.

    The same m keeps the held-out batches (train.micro_batch_size sequences each) comparable.
    """
    tmp = tmp_path_factory.mktemp("ref")
    return {(n, m): _run(_config(tmp, f"ref{n}-{m}", n, m).to_dict(), world_mesh=False)
            for n in (4, 8) for m in (1, 2, 4, 8)}


@pytest.fixture(scope="module")
def pipeline_runs(pools, tmp_path_factory):
    """{pp: {(schedule, m, v): per-rank results}}: every case of one pp size in one pool call."""
    tmp = tmp_path_factory.mktemp("pp")
    out = {}
    for pp in (2, 4):
        cases = _cases(pp)
        jobs = [(_config(tmp, f"pp{pp}-{s}-{m}", _n_layer(pp, v), m, pp=pp, schedule=s,
                         virtual_stages=v).to_dict(), {}) for s, m, v in cases]
        per_rank = pools(pp).run(_run_many, jobs)
        out[pp] = {case: [rank[i] for rank in per_rank] for i, case in enumerate(cases)}
    return out


@pytest.mark.parametrize("pp", [2, 4])
def test_every_schedule_trains_like_one_process(pipeline_runs, references, pp):
    for (schedule, m, v), ranks in pipeline_runs[pp].items():
        ref = references[(_n_layer(pp, v), m)]
        where = f"pp={pp} {schedule} m={m} v={v}"
        assert max_abs_diff(ranks[0]["params"], ref["params"]) < 1e-5, where
        for r in ranks:  # the loss is reported on every rank, as one process sees it
            assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5), where
            assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5), where
            assert r["val"] == pytest.approx(ref["val"], abs=1e-5), where


@pytest.mark.parametrize("pp", [2, 4])
def test_tied_embedding_and_head_stay_identical(pipeline_runs, pp):
    for case, ranks in pipeline_runs[pp].items():
        first, last = ranks[0]["stage"], ranks[-1]["stage"]
        assert "head.weight" not in first and "tok_emb.weight" not in last, case
        assert torch.equal(first["tok_emb.weight"], last["head.weight"]), case


@pytest.mark.parametrize("pp", [2, 4])
def test_1f1b_stashes_at_most_p_micro_batches_gpipe_stashes_m(pipeline_runs, pp):
    for (schedule, m, v), ranks in pipeline_runs[pp].items():
        peaks = ranks[0]["metrics"]["pp_peak_stashed"]  # per stage, counted by the runtime
        if schedule == "1f1b":
            assert peaks == [min(pp - r, m) for r in range(pp)]
            assert max(peaks) <= pp
            assert m <= pp or max(peaks) < m  # fewer than GPipe whenever m > p
        elif schedule == "gpipe":
            assert peaks == [m] * pp
        elif schedule == "naive":
            assert peaks == [1] * pp


@pytest.mark.parametrize("pp", [2, 4])
def test_bubble_is_reported_next_to_its_theory(pipeline_runs, pp):
    for (schedule, m, v), ranks in pipeline_runs[pp].items():
        metrics = ranks[0]["metrics"]
        assert metrics["bubble_theory"] == pytest.approx(theoretical_bubble(schedule, pp, m, v))
        assert len(metrics["bubble_per_stage"]) == pp
        assert all(0.0 <= b < 1.0 for b in metrics["bubble_per_stage"])
        assert all(c > 0 for c in metrics["pp_compute_s"])
        # Replaying the step's own action times with free communication cannot take longer
        # than the step did, so its bubble is a lower bound of the measured one.
        assert 0.0 <= metrics["bubble_model"] <= metrics["bubble"] + 1e-9


def test_dp2_pp2_trains_like_one_process(pools, references, tmp_path):
    """dp=2 × pp=2 on 4 processes; each step's 4 sequences per dp rank re-cut into
    parallel.microbatches = 2 pipeline micro-batches; measured-time balance (rank 0's timing,
    broadcast) and activation recomputation compose with the stages."""
    cfg = _config(tmp_path, "dp2pp2", 4, m=1, dp=2, pp=2, schedule="1f1b", microbatches=2,
                  partition="time", recompute="full")
    ranks = pools(4).run(_run, cfg.to_dict())
    ref = references[(4, 1)]
    assert max_abs_diff(ranks[0]["params"], ref["params"]) < 1e-5
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        assert r["val"] == pytest.approx(ref["val"], abs=1e-5)
    assert ranks[0]["metrics"]["pp_peak_stashed"] == [2, 1]  # 1F1B over the 2 re-cut micro-batches
    # dp replicas of a stage hold the same values, bit for bit (ranks: (pp·dp + dp_idx))
    assert max_abs_diff(ranks[0]["stage"], ranks[1]["stage"]) == 0.0
    assert max_abs_diff(ranks[2]["stage"], ranks[3]["stage"]) == 0.0


@pytest.mark.parametrize("save_at,resume_at", [
    (dict(dp=2, pp=2), dict(pp=4)),
    (dict(dp=2, pp=2), dict(pp=1)),
    (dict(pp=1), dict(dp=2, pp=2, schedule="interleaved", virtual_stages=2)),
])
def test_checkpoint_loads_at_another_pipeline_size(pools, references, tmp_path, save_at, resume_at):
    """3 steps under one layout, saved; steps 4-5 under another: equal to 5 steps in one process."""
    def cfg(layout, resume):
        m = 4 if layout.get("pp", 1) > 1 else 1
        c = _config(tmp_path, "run", 4, m=m, **layout)
        c.checkpoint.resume = resume
        return c.to_dict()

    def run(layout, world, **kw):
        if world == 1:
            return [_run(cfg(layout, kw.pop("resume")), world_mesh=False, **kw)]
        return pools(world).run(_run, cfg(layout, kw.pop("resume")), **kw)

    size = lambda layout: layout.get("dp", 1) * layout.get("pp", 1)  # noqa: E731
    run(save_at, size(save_at), resume="none", stop_at=3)
    out = run(resume_at, size(resume_at), resume="auto")[0]
    ref = references[(4, 1)]
    assert out["losses"] == pytest.approx(ref["losses"][3:], abs=1e-5)
    assert out["grad_norms"] == pytest.approx(ref["grad_norms"][3:], rel=1e-5)
    assert max_abs_diff(out["params"], ref["params"]) < 1e-5


def test_3d_dp2_pp2_tp2_trains_like_one_process_and_reshards(pools, references, tmp_path):
    """(dp, pp, tp) = (2, 2, 2) on 8 processes with 1F1B and selective recomputation; a checkpoint
    saved there after 3 steps continues at (1, 4, 1) like one process. Eight processes on two cores are kept to this one
    layout to keep the suite short; interleaving is covered at pp=2 and 4, sequence parallelism
    at dp×tp (not yet inside pipeline stages)."""
    m = 4
    layouts = {"1f1b": dict(dp=2, pp=2, tp=2, schedule="1f1b", partition="flops", recompute="selective")}
    jobs = [(_config(tmp_path, name, 4, m, **layout).to_dict(), {}) for name, layout in layouts.items()]
    jobs.append((_config(tmp_path, "reshard", 4, m, **layouts["1f1b"]).to_dict(), {"stop_at": 3}))
    per_rank = pools(8).run(_run_many, jobs)
    ref = references[(4, m)]
    for i, name in enumerate(layouts):
        ranks = [r[i] for r in per_rank]
        assert max_abs_diff(ranks[0]["params"], ref["params"]) < 1e-5, name
        for r in ranks:
            assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5), name
            assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5), name
            assert r["val"] == pytest.approx(ref["val"], abs=1e-5), name
        # rank 0 = (pp 0, dp 0, tp 0) and rank 4 = (pp 1, dp 0, tp 0) hold the same tied shard
        assert torch.equal(ranks[0]["stage"]["tok_emb.weight"], ranks[4]["stage"]["head.weight"]), name
    cfg = _config(tmp_path, "reshard", 4, m, pp=4)
    cfg.checkpoint.resume = "auto"
    out = pools(4).run(_run, cfg.to_dict())[0]
    assert out["losses"] == pytest.approx(ref["losses"][3:], abs=1e-5)
    assert out["grad_norms"] == pytest.approx(ref["grad_norms"][3:], rel=1e-5)
    assert max_abs_diff(out["params"], ref["params"]) < 1e-5
