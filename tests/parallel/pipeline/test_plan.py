"""Pipeline planning without processes: schedules, partitions and the errors for bad layouts."""

from __future__ import annotations

import pytest
import torch

from plait.config import load_config
from plait.errors import ConfigError, PlanError
from plait.models import GPT
from plait.parallel.pipeline import (COSTS, SCHEDULES, balance, build_schedule, bubble_vs_ideal,
                                     check_schedule, make_partition, pipeline_spec, replay,
                                     simulate, theoretical_bubble)
from tests.helpers import tiny_model_config


def _cases():
    for schedule in SCHEDULES:
        for p in (1, 2, 3, 4):
            for m in (1, 2, 3, 4, 8):
                for v in ((1, 2, 3) if schedule == "interleaved" else (1,)):
                    if schedule != "interleaved" or m % p == 0:
                        yield schedule, p, m, v


@pytest.mark.parametrize("schedule,p,m,v", list(_cases()))
def test_schedules_finish_and_match_their_theoretical_bubble(schedule, p, m, v):
    """Every rank's action order respects the data dependencies (no deadlock), each (chunk,
    micro-batch) runs forward and backward exactly once, and with equal stages the idle share
    is the textbook bubble."""
    sim = simulate(schedule, p, m, v)
    assert sim.finished
    for r in range(p):
        actions = build_schedule(schedule, p, m, v, r)
        chunks = range(r, p * v, p) if schedule == "interleaved" else [r]
        expected = {(k, g, mb) for k in "FB" for g in chunks for mb in range(m)}
        assert {(a.kind, a.chunk, a.mb) for a in actions} == expected and len(actions) == len(expected)
    idle = 1 - sum(sim.busy) / (p * sim.makespan)
    assert idle == pytest.approx(theoretical_bubble(schedule, p, m, v))


@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (4, 4), (4, 8), (4, 16)])
def test_1f1b_stashes_at_most_p_micro_batches_while_gpipe_stashes_m(p, m):
    assert max(simulate("1f1b", p, m).peak_stashed) == min(p, m)
    assert simulate("gpipe", p, m).peak_stashed == [m] * p
    assert simulate("naive", p, m).peak_stashed == [1] * p


def test_replay_with_a_slow_last_stage_matches_a_hand_count():
    """1F1B, p = 2, m = 2; stage 0 takes F=1, B=2, stage 1 twice that. Stage 1 is the bottleneck:
    F0 on stage 0 [0,1], then stage 1 runs F0 [1,3] B0 [3,7] F1 [7,9] B1 [9,13]; stage 0 runs
    F1 [1,2], B0 [7,9], B1 [13,15]."""
    plans = [build_schedule("1f1b", 2, 2, 1, r) for r in range(2)]
    scale = {0: 1.0, 1: 2.0}
    sim = replay(plans, lambda r, a: scale[r] * (1.0 if a.kind == "F" else 2.0))
    assert sim.finished and sim.makespan == pytest.approx(15.0)
    assert sim.busy == [6.0, 12.0]
    assert sim.bubble == pytest.approx(((1 - 6 / 15) + (1 - 12 / 15)) / 2)
    # equal stages reproduce the closed form
    assert replay(plans, lambda r, a: 1.0 if a.kind == "F" else 2.0).bubble == pytest.approx(
        theoretical_bubble("1f1b", 2, 2))


def test_measured_time_partition_charges_the_loss_to_the_last_layer():
    """The "time" cost runs the model's loss on the head's output; the other layers back-propagate
    their output's sum."""
    spec = pipeline_spec(GPT(tiny_model_config()))
    calls = []
    loss_fn = spec.loss_fn
    spec.loss_fn = lambda logits, targets: calls.append(tuple(logits.shape)) or loss_fn(logits, targets)
    make_partition(spec, 2, cost="time")
    cfg = tiny_model_config()
    assert calls and all(shape == (1, cfg.block_size, cfg.vocab_size) for shape in calls)


def test_bubble_formulas():
    assert theoretical_bubble("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("interleaved", 4, 8, 2) == pytest.approx(3 / 19)
    assert theoretical_bubble("naive", 4, 8) == pytest.approx(3 / 4)
    # Narayanan et al.'s normalisation: bubble time over ideal time, (p-1)/(v·m)
    assert bubble_vs_ideal("interleaved", 4, 8, 2) == pytest.approx(3 / 16)
    assert bubble_vs_ideal("1f1b", 4, 8) == pytest.approx(3 / 8)


def test_balance_minimises_the_largest_chunk():
    assert balance([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance([4, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert balance([1, 2, 3, 4, 5, 6], 3) == [(0, 3), (3, 5), (5, 6)]
    with pytest.raises(PlanError, match="at least 5 layers"):
        balance([1, 1, 1], 5)


@pytest.mark.parametrize("cost", COSTS)
def test_gpt_partition_covers_the_layers_in_order(cost):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=4))
    before = [p.clone() for p in model.parameters()]
    part = make_partition(pipeline_spec(model), stages=3, cost=cost)
    assert part.bounds[0][0] == 0 and part.bounds[-1][1] == 6
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(part.bounds, part.bounds[1:]))
    assert len(part.costs) == 6 and all(c >= 0 for c in part.costs)
    text = str(part)
    assert "chunk 0 (stage 0)" in text and "chunk 2 (stage 2)" in text and "head" in text
    # measuring costs leaves the model as it was: no gradients, same weights
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_params_partition_of_gpt_is_balanced():
    model = GPT(tiny_model_config(n_layer=4, n_embd=32))
    part = make_partition(pipeline_spec(model), stages=4, cost="params")
    costs = [part.chunk_cost(g) for g in range(4)]
    # No contiguous split of [embedding, 4 blocks, head] into 4 has a smaller largest chunk.
    assert max(costs) == min(max(sum(part.costs[a:b]) for a, b in bounds)
                             for bounds in _all_splits(6, 4))


def _all_splits(n, k, start=0):
    if k == 1:
        yield [(start, n)]
        return
    for cut in range(start + 1, n - k + 2):
        for rest in _all_splits(n, k - 1, cut):
            yield [(start, cut)] + rest


def test_interleaved_partition_splits_blocks_evenly():
    model = GPT(tiny_model_config(n_layer=8))
    part = make_partition(pipeline_spec(model), stages=2, virtual_stages=2, interleaved=True)
    # [emb + 2 blocks], [2 blocks], [2 blocks], [2 blocks + head]; chunk g on rank g mod 2
    assert part.bounds == ((0, 3), (3, 5), (5, 7), (7, 10))
    assert part.chunks_of(0) == [0, 2] and part.chunks_of(1) == [1, 3]


# --- bad input: clear errors before training starts ------------------------------------------


def _load(**fields):
    overrides = [f"{k.replace('__', '.')}={v!r}" if isinstance(v, str) else f"{k.replace('__', '.')}={v}"
                 for k, v in fields.items()]
    return load_config(None, [o.replace("'", '"') for o in overrides])


@pytest.mark.parametrize("fields,message", [
    (dict(parallel__pp=7, model__n_layer=4), r"parallel.pp=7 stages exceed the model's 6 pipeline layers"),
    (dict(parallel__pp=2, parallel__schedule="interleaved", parallel__virtual_stages=3, model__n_layer=4),
     r"parallel.virtual_stages=3 .* multiple of pp × virtual_stages = 6"),
    (dict(parallel__pp=4, parallel__schedule="interleaved", train__grad_accum=6, model__n_layer=8),
     r"m = 6\) to be a multiple of parallel.pp = 4"),
    (dict(parallel__pp=2, parallel__schedule="interleaved", parallel__microbatches=3, train__grad_accum=3),
     r"m = 3\) to be a multiple of parallel.pp = 2"),
    (dict(parallel__pp=2, parallel__microbatches=3, train__micro_batch_size=4, train__grad_accum=2),
     r"parallel.microbatches=3 must divide the 8 sequences"),
    (dict(parallel__pp=2, parallel__virtual_stages=2), r"virtual_stages=2 needs parallel.schedule"),
    (dict(parallel__pp=2, parallel__schedule="zigzag"), r"parallel.schedule='zigzag' is invalid; valid: naive"),
    (dict(parallel__pp=2, parallel__partition="vibes"), r"parallel.partition='vibes' is invalid"),
    (dict(parallel__microbatches=4), r"parallel.microbatches=4 applies to pipelines only"),
    (dict(parallel__pp=2, parallel__microbatches=-1), r"parallel.microbatches=-1 must be ≥ 0"),
    (dict(parallel__pp=2, parallel__zero=1), r"parallel.pp=2 cannot be combined with parallel.zero=1"),
])
def test_bad_pipeline_layouts_fail_at_config_time(fields, message):
    with pytest.raises(ConfigError, match=message):
        _load(**fields)


def test_good_pipeline_layouts_load():
    cfg = _load(parallel__pp=4, parallel__schedule="interleaved", parallel__virtual_stages=2,
                model__n_layer=8, train__grad_accum=8)
    assert cfg.parallel.schedule == "interleaved"
    _load(parallel__pp=6, model__n_layer=4, train__grad_accum=1)  # one layer per stage is fine


def test_runtime_rejects_micro_batch_counts_the_schedule_cannot_run():
    with pytest.raises(ConfigError, match="m = 6"):
        check_schedule("interleaved", 4, 2, microbatches=6)
    check_schedule("1f1b", 4, 1, microbatches=3)  # 1F1B runs any m (fewer than p just warms up less)


def test_cli_refuses_a_bad_pipeline_before_launching(tmp_path, capsys):
    from plait.cli import main
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model]\nn_layer = 2\n[parallel]\npp = 5\n")
    assert main(["train", str(cfg), "--nproc", "5"]) == 2
    assert "parallel.pp=5 stages exceed" in capsys.readouterr().err.replace("\n", " ")
