"""Hints: each rule fires on the situation it names, with the setting to change."""

from __future__ import annotations

from pathlib import Path

from plait.mesh import MeshShape
from plait.profile.analysis import Analysis, RankSummary
from plait.profile.hints import hints
from plait.profile.hta import hta_breakdown
from plait.profile.stragglers import Straggler, find_stragglers, peer_groups, stage_imbalance


def _rank(rank: int, step: float, compute: float, comm: float, pp: int = 0, data: float = 0.0,
          overlapped: float = 0.0, in_flight: float = 0.0) -> RankSummary:
    phases = {"data": data, "forward": (compute - data) / 3, "backward": 2 * (compute - data) / 3,
              "optimizer": 0.0, "other": 0.0}
    return RankSummary(rank, {"pp": pp}, [3], step, step, compute, comm, step - compute - comm, 0.0,
                       in_flight, overlapped, phases)


def _analysis(ranks, shape, config=None, metrics=None, stragglers=(), imbalance=None) -> Analysis:
    return Analysis(Path("run"), metrics or [], config or {}, shape, list(ranks), list(stragglers),
                    imbalance=imbalance)


def test_naive_reducer_gets_the_bucketed_one():
    a = _analysis([_rank(0, 1.0, 0.6, 0.35), _rank(1, 1.0, 0.6, 0.35)], MeshShape(dp=2),
                  {"parallel": {"reducer": "naive"}})
    assert any("enable the bucketed reducer" in h and 'parallel.reducer = "bucketed"' in h for h in hints(a))


def test_low_overlap_with_buckets_suggests_smaller_buckets():
    ranks = [_rank(r, 1.0, 0.8, 0.15, in_flight=0.2, overlapped=0.01) for r in range(2)]
    a = _analysis(ranks, MeshShape(dp=2), {"parallel": {"reducer": "bucketed", "bucket_mb": 25.0}})
    assert any("lower bucket_mb" in h and "25.0" in h for h in hints(a))


def test_bubble_asks_for_more_microbatches():
    ranks = [_rank(0, 1.0, 0.6, 0.05, pp=0), _rank(1, 1.0, 0.6, 0.05, pp=1)]
    a = _analysis(ranks, MeshShape(pp=2), {"parallel": {"schedule": "1f1b"}, "train": {"grad_accum": 2}},
                  metrics=[{"step": 3, "bubble": 0.35}])
    (h,) = [h for h in hints(a) if h.startswith("bubble")]
    assert "bubble 35%" in h and "raise micro-batches" in h and "m = 2" in h


def test_stragglers_and_imbalance_name_rank_phase_and_the_cure():
    s = Straggler(rank=1, busy_s=0.4, peers_s=0.2, phase="backward", phase_excess_s=0.15)
    a = _analysis([_rank(0, 0.5, 0.2, 0.3), _rank(1, 0.5, 0.4, 0.1)], MeshShape(dp=2), stragglers=[s])
    text = " ".join(hints(a))
    assert "rank 1 is a straggler, 2.00×" in text and "backward" in text and 'profile.balance = "speed"' in text
    a = _analysis([_rank(0, 1.0, 0.3, 0.0), _rank(1, 1.0, 0.6, 0.0, pp=1)], MeshShape(pp=2), imbalance=(1, 1.33))
    assert any("pipeline stage 1 does 1.33×" in h and 'parallel.partition = "time"' in h for h in hints(a))


def test_data_loading_and_a_healthy_run():
    a = _analysis([_rank(0, 1.0, 0.9, 0.05, data=0.2)], MeshShape())
    assert any(h.startswith("data loading is 20%") for h in hints(a))
    a = _analysis([_rank(0, 1.0, 0.95, 0.02)], MeshShape())
    assert hints(a) == ["no bottleneck stands out: compute is 95% of the 1000.0 ms step on average."]


def test_straggler_detection_against_peers_with_the_phase():
    busy = {0: 0.20, 1: 0.21, 2: 0.42, 3: 0.19}
    phases = {r: {"forward": 0.07, "backward": 0.13} for r in busy}
    phases[2] = {"forward": 0.08, "backward": 0.34}
    (s,) = find_stragglers(busy, [[0, 1, 2, 3]], 0.2, phases)
    assert (s.rank, s.phase) == (2, "backward")
    assert s.ratio == 0.42 / 0.20
    assert find_stragglers(busy, [[0, 1, 2, 3]], 1.5, phases) == []
    assert find_stragglers({0: 1.0}, [[0]], 0.2) == []  # no peers, no straggler
    assert peer_groups(MeshShape(dp=2, pp=2)) == [[0, 1], [2, 3]]
    assert stage_imbalance([0.1, 0.3]) == (1, 0.3 / 0.1)


def test_hta_is_skipped_with_a_reason_for_cpu_traces_and_without_the_package(monkeypatch, tmp_path):
    assert "CPU traces" in hta_breakdown({0: tmp_path / "rank0.trace.json"}, gpu=False).skipped
    monkeypatch.setitem(__import__("sys").modules, "hta", None)  # as if not installed
    assert "not installed" in hta_breakdown({0: tmp_path / "rank0.trace.json"}, gpu=True).skipped


def test_a_straggler_left_after_the_speed_split_gets_other_advice():
    s = Straggler(rank=1, busy_s=0.3, peers_s=0.2, phase="forward", phase_excess_s=0.05)
    a = _analysis([_rank(0, 0.5, 0.2, 0.3), _rank(1, 0.5, 0.3, 0.2)], MeshShape(dp=2),
                  {"profile": {"balance": "speed"}}, metrics=[{"step": 3, "dp_split": [10, 6]}], stragglers=[s])
    (h,) = [h for h in hints(a) if h.startswith("rank 1")]
    assert "already split by speed ([10, 6])" in h and "profile.balance_steps" in h
