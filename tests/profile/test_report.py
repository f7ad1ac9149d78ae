"""Traces and the report on real runs (dp=2 and pp=2 on the Gloo pool), with rank 1 made slow."""

from __future__ import annotations

import json
import struct

import pytest

from plait.cli import main
from plait.profile.analysis import analyse
from plait.profile.capture import meta_path, trace_path
from plait.profile.report import write_report
from plait.profile.trace import breakdown, load_events
from tests.helpers import tiny_run_config
from tests.profile.support import train_run


def _slow_run(pools, folder, phase: str, **sections):
    cfg = tiny_run_config(folder, model={"n_embd": 128, "block_size": 32},
                          train={"steps": 5, "micro_batch_size": 8},
                          profile={"steps": 3, "slow_rank": 1, "slow_factor": 2.0, "slow_phase": phase,
                                   "straggler_interval": 2}, **sections)
    pools(2).run(train_run, cfg.to_dict())
    return folder / "run"


@pytest.fixture(scope="module")
def slow_run(pools, tmp_path_factory):
    """dp=2, rank 1 twice as slow in forward and backward, steps 2-4 traced."""
    return _slow_run(pools, tmp_path_factory.mktemp("slow"), "compute")


def test_breakdown_adds_up_to_the_measured_step_time(slow_run):
    for rank in (0, 1):
        meta = json.loads(meta_path(slow_run / "profile", rank).read_text())
        steps = breakdown(load_events(trace_path(slow_run / "profile", rank)), rank)
        assert [b.step for b in steps] == meta["steps"] == [2, 3, 4]
        for b in steps:
            measured = meta["step_time_s"][str(b.step)]  # the trainer's own clock
            assert b.compute_s + b.comm_s + b.idle_s == pytest.approx(measured, rel=0.10)
            assert b.compute_s > 0 and b.comm_s > 0


def test_the_slow_rank_is_named_with_the_phase_it_loses_time_in(slow_run, pools, tmp_path):
    (s,) = analyse(slow_run).stragglers
    assert s.rank == 1 and s.ratio > 1.2
    assert s.phase in ("forward", "backward")  # slowed there; its optimizer and data are not
    backward_only = _slow_run(pools, tmp_path, "backward")
    (s,) = analyse(backward_only).stragglers
    assert (s.rank, s.phase) == (1, "backward")


def test_live_statistics_flag_the_slow_rank(slow_run):
    records = [json.loads(line) for line in (slow_run / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in records if "rank_busy_s" in r]
    assert [r["step"] for r in stats] == [2, 4]
    assert all(len(r["rank_busy_s"]) == 2 for r in stats)
    assert any(r["stragglers"] == [1] for r in stats)


def test_trace_names_phases_and_collectives_with_group_and_bytes(slow_run):
    names = {e["name"] for e in load_events(trace_path(slow_run / "profile", 0))}
    assert {"plait/step 2", "plait/step 4", "plait/data", "plait/forward", "plait/backward",
            "plait/optimizer"} <= names
    grads = [n for n in names if n.startswith("plait/comm all_reduce dp ") and n.endswith(" MB")]
    assert grads and any(n.startswith("plait/wait all_reduce dp ") for n in names)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_writes_plots_and_a_summary(slow_run, capsys):
    report = write_report(slow_run)
    names = {p.name for p in report.files}
    assert {"loss.png", "throughput.png", "timeline.png", "breakdown.png", "rank_busy.png",
            "summary.txt", "summary.json"} <= names
    for name in ("loss.png", "timeline.png", "breakdown.png"):
        width, height = _png_size(report.folder / name)
        assert width > 300 and height > 150
    assert "rank 1 is a straggler" in report.text and "traced: steps 2, 3, 4 on 2 ranks" in report.text
    assert 'profile.balance = "speed"' in report.text  # the hint for a slow rank
    summary = json.loads((report.folder / "summary.json").read_text())
    assert summary["stragglers"][0]["rank"] == 1 and len(summary["ranks"]) == 2
    assert main(["report", str(slow_run), "--out", str(slow_run / "again")]) == 0
    assert "rank 1 is a straggler" in capsys.readouterr().out


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens_per_s": 10.0}\n')
    report = write_report(tmp_path)  # metrics only: curves, and how to get traces
    assert "rerun with `plait train CONFIG --profile N`" in report.text
    assert {p.name for p in report.files} >= {"loss.png", "throughput.png", "summary.txt"}


def test_pipeline_traces_name_each_action_and_show_the_bubble(pools, tmp_path):
    cfg = tiny_run_config(tmp_path, model={"n_layer": 2}, train={"steps": 3, "grad_accum": 4},
                          parallel={"pp": 2, "schedule": "1f1b"}, profile={"steps": 1})
    pools(2).run(train_run, cfg.to_dict())
    run = tmp_path / "run"
    names = {e["name"] for e in load_events(trace_path(run / "profile", 1))}
    assert {f"plait/pp F1 mb{k}" for k in range(4)} | {f"plait/pp B1 mb{k}" for k in range(4)} <= names
    assert any(n.startswith("plait/wait irecv pp ") for n in names)
    first = {e["name"] for e in load_events(trace_path(run / "profile", 0))}
    assert {"plait/pp F0 mb0", "plait/pp B0 mb3"} <= first
    a = analyse(run)
    for r in a.ranks:
        assert r.accounted_s == pytest.approx(r.measured_step_s, rel=0.10)
        assert r.phases["forward"] > 0 and r.phases["backward"] > 0
    report = write_report(run)
    assert "pipeline bubble:" in report.text
