"""Membership changes under plait's elastic agents (one process per node, c10d rendezvous on
127.0.0.1): a worker killed with SIGKILL, and a node joining mid-run. The job finishes at the new
size, each sample of the epoch is trained on exactly once, and the final parameters equal, bit for
bit, a run that changes world size at the same step on purpose.

Scaling up is tested 2 → 4 nodes: two spare nodes, started in advance, are let in together.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from plait.elastic.membership import read_rounds, read_workers
from plait.elastic.samples import read_samples
from plait.launch import ElasticJob
from plait.train.checkpoint import checkpoint_step, list_checkpoints
from plait.train.metrics import read_metrics
from tests.elastic.elastic_setup import (
    SEQUENCES,
    STEPS,
    corpus,
    elastic_config,
    final_model,
    reference_run,
    wait_for,
)

JOB_TIMEOUT_S = 240


def _alive(job: ElasticJob):
    return lambda: any(p.poll() is None for p in job.nodes)


def _last_step(out_dir) -> int:
    records = read_metrics(out_dir)
    return records[-1]["step"] if records else 0


def _last_checkpoint_step(out_dir) -> int:
    """The step of the newest checkpoint folder (they appear whole, by rename)."""
    folders = list_checkpoints(out_dir / "checkpoints")
    return checkpoint_step(folders[-1]) if folders else 0


def _check_epoch_once(out_dir) -> None:
    records = read_samples(out_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    ids = [i for r in records for d in r["draws"] for i in d["ids"]]
    assert all(d["epoch"] == 0 for r in records for d in r["draws"])
    assert sorted(ids) == list(range(SEQUENCES)), "a sample was lost or repeated"
    for r in records:  # the global batch was kept at every size
        assert sum(len(d["ids"]) for d in r["draws"]) == 12


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{k} differs by {(v - b[k]).abs().max().item():.3g}"


def test_killed_worker_leaves_and_the_job_finishes_at_the_smaller_size(tmp_path, pools):
    corpus(tmp_path)
    cfg = elastic_config(tmp_path, "run")
    kill_after = random.Random().randint(2, 4)  # a random step of the 8
    victim = random.Random().choice([0, 1, 2])
    with ElasticJob(cfg, nodes=3, min_nodes=2, max_nodes=3, work_dir=tmp_path / "job") as job:
        # The checkpoint, not the metrics record: a step is logged before its checkpoint is
        # written, and a kill between the two rightly resumes from the step before.
        wait_for(f"step {kill_after}", lambda: _last_checkpoint_step(tmp_path / "run") >= kill_after,
                 JOB_TIMEOUT_S, while_alive=_alive(job))
        os.kill(read_workers(tmp_path / "run")[victim]["pid"], signal.SIGKILL)
        # Steps may have gone on between the check above and the kill (a loaded machine can
        # hold this process back for seconds); none can complete without the victim after it,
        # and rank 0's log lags the victim by at most the step under way.
        seen_at_kill = _last_step(tmp_path / "run")
        summary = job.wait(JOB_TIMEOUT_S)
        outcomes = job.outcomes()
    assert summary["step"] == STEPS
    assert sum(1 for o in outcomes if o and o["left"]) == 1, outcomes
    rounds = read_rounds(tmp_path / "run")
    assert [r["world_size"] for r in rounds] == [3, 2], rounds
    assert rounds[1]["namespace"] != rounds[0]["namespace"]  # the store keys of each round apart
    resumed = rounds[1]["step"]
    assert kill_after <= resumed <= seen_at_kill + 1, (kill_after, seen_at_kill, rounds)
    _check_epoch_once(tmp_path / "run")

    ref = {**elastic_config(tmp_path, "reference"), "elastic": {**cfg["elastic"], "min_nodes": 2, "max_nodes": 3}}
    reference_run(pools, ref, [(3, resumed), (2, None)])
    _same_bits(final_model(tmp_path / "run"), final_model(tmp_path / "reference"))


def test_joining_nodes_scale_the_job_up_from_2_to_4(tmp_path, pools):
    corpus(tmp_path)
    cfg = elastic_config(tmp_path, "run")
    cfg["train"]["micro_batch_size"] = 1  # a global batch of 12 at dp 2 and at dp 4 (accumulation 6, 3)
    # Steps are made slow (profile's testing knob: rank 0 stalls), so the join always lands
    # before the last step; the spares are started in advance, so joining costs no start-up.
    cfg["profile"] = {"slow_rank": 0, "slow_factor": 200.0}
    join_after = random.Random().randint(2, 3)
    with ElasticJob(cfg, nodes=0, min_nodes=2, max_nodes=4, work_dir=tmp_path / "job") as job:
        for _ in range(2):
            job.add_node(standby=True)  # started up before the job, so they are ready in time
        wait_for("the spare nodes", lambda: job.standby_ready(0) and job.standby_ready(1), JOB_TIMEOUT_S,
                 while_alive=_alive(job))
        job.add_node()
        job.add_node()
        wait_for(f"step {join_after}", lambda: _last_step(tmp_path / "run") >= join_after,
                 JOB_TIMEOUT_S, while_alive=_alive(job))
        assert _last_step(tmp_path / "run") < STEPS - 2
        job.activate(0)
        job.activate(1)
        summary = job.wait(JOB_TIMEOUT_S)
        assert all(o and o["ok"] for o in job.outcomes()), job.outcomes()
    assert summary["step"] == STEPS
    rounds = read_rounds(tmp_path / "run")
    # Both spares usually arrive within one rendezvous round; if the second misses it, the job
    # grows 2 → 3 → 4 instead, which the reference below repeats.
    sizes = [r["world_size"] for r in rounds]
    assert sizes in ([2, 4], [2, 3, 4]), rounds
    assert join_after <= rounds[1]["step"] < STEPS, (join_after, rounds)
    _check_epoch_once(tmp_path / "run")

    ref = {**elastic_config(tmp_path, "reference"), "elastic": {**cfg["elastic"], "min_nodes": 2, "max_nodes": 4}}
    ref["train"]["micro_batch_size"] = 1
    phases = [(r["world_size"], nxt["step"]) for r, nxt in zip(rounds, rounds[1:])] + [(sizes[-1], None)]
    reference_run(pools, ref, phases)  # (the stall changes no number)
    _same_bits(final_model(tmp_path / "run"), final_model(tmp_path / "reference"))


def test_batch_keep_changes_accumulation_and_refuses_a_batch_that_cannot_be_kept(tmp_path):
    from plait.config import Config
    from plait.elastic.membership import batch_plan, check_elastic
    from plait.errors import ConfigError

    cfg = Config.from_dict(elastic_config(tmp_path, "run", min_nodes=2, max_nodes=3))
    assert [(batch_plan(cfg, w).grad_accum, batch_plan(cfg, w).global_batch) for w in (2, 3)] == [(3, 12), (2, 12)]
    check_elastic(cfg)
    wide = Config.from_dict(elastic_config(tmp_path, "run", min_nodes=2, max_nodes=4))
    with pytest.raises(ConfigError, match=r"elastic.global_batch: the global batch 12 is not a multiple "
                                          r"of dp × train.micro_batch_size = 4 × 2.*\(2, 3, 4\)"):
        check_elastic(wide)


def test_batch_rescale_keeps_accumulation(tmp_path):
    from plait.config import Config
    from plait.elastic.membership import batch_plan, check_elastic

    cfg = Config.from_dict(elastic_config(tmp_path, "run", batch="rescale", min_nodes=2, max_nodes=4))
    check_elastic(cfg)
    assert [(batch_plan(cfg, w).grad_accum, batch_plan(cfg, w).global_batch) for w in (2, 3, 4)] == [
        (1, 4), (1, 6), (1, 8)]
