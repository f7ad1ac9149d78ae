"""plait's own trace analysis on a hand-made Chrome trace: the split adds up, phases and
communication land where they happened, pipeline waits count as idle, overlap is measured."""

from __future__ import annotations

import json

import pytest

from plait.errors import DataError
from plait.profile.trace import breakdown, has_gpu_kernels, load_events


def _x(name: str, ts: float, dur: float, tid: int = 1, cat: str = "user_annotation") -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "cat": cat}


def _trace() -> list[dict]:
    # One 1000 µs step on thread 1; Gloo runs on thread 2.
    return [
        _x("plait/step 7", 0, 1000),
        _x("plait/data", 0, 50),
        _x("aten::index", 10, 30, cat="cpu_op"),
        _x("plait/forward", 100, 200),
        _x("aten::mm", 110, 150, cat="cpu_op"),
        _x("plait/backward", 300, 400),
        _x("plait/comm all_reduce dp 1.2 MB", 500, 20),     # an async launch inside backward
        _x("plait/wait all_reduce dp 1.2 MB", 650, 50),     # exposed: waiting at the end
        _x("plait/wait irecv pp 4 KB", 720, 60),            # a pipeline neighbour: bubble
        _x("plait/optimizer", 800, 150),
        _x("plait/comm all_reduce dp 8 B", 900, 30),        # clipping's norm all-reduce
        _x("gloo:all_reduce", 520, 180, tid=2),             # in flight: 520-700
        _x("gloo:all_reduce", 900, 30, tid=2),
        _x("ProfilerStep#1", 0, 1000),
    ]


def test_step_splits_into_compute_communication_and_idle():
    (b,) = breakdown(_trace(), rank=3)
    assert (b.rank, b.step) == (3, 7)
    assert b.wall_s == pytest.approx(1000e-6)
    assert b.comm_s == pytest.approx((20 + 50 + 30) * 1e-6)
    assert b.p2p_wait_s == pytest.approx(60e-6)
    # compute: data 50, forward 200, backward 400 - 20 - 50, optimizer 150 - 30
    assert b.phases["data"] == pytest.approx(50e-6)
    assert b.phases["forward"] == pytest.approx(200e-6)
    assert b.phases["backward"] == pytest.approx(330e-6)
    assert b.phases["optimizer"] == pytest.approx(120e-6)
    assert b.phases["other"] == pytest.approx(0.0)
    assert b.compute_s == pytest.approx(sum(b.phases.values()))
    assert b.compute_s + b.comm_s + b.idle_s == pytest.approx(b.wall_s)
    assert b.idle_s == pytest.approx((50 + 20 + 60 + 20 + 50) * 1e-6)  # gaps + the pipeline wait
    # Gloo was in flight 520-700 and 900-930; it overlapped backward's compute 520-650.
    assert b.in_flight_s == pytest.approx(210e-6)
    assert b.overlapped_s == pytest.approx(130e-6)
    kinds = {k for _, _, k in b.segments}
    assert {"forward", "backward", "communication", "bubble", "idle"} <= kinds
    assert sum(e - s for s, e, _ in b.segments) == pytest.approx(b.wall_s)


def test_traces_without_plait_steps_and_bad_files(tmp_path):
    assert breakdown([_x("aten::mm", 0, 10, cat="cpu_op")], 0) == []
    assert not has_gpu_kernels(_trace())
    assert has_gpu_kernels([_x("ampere_sgemm", 0, 5, cat="kernel")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_events(bad)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"schemaVersion": 1}))
    with pytest.raises(DataError, match="traceEvents"):
        load_events(empty)
