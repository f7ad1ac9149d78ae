"""Sweeps on a local Ray instance sized like this machine (2 CPUs): ASHA stops trials early, the
best config is written and trains, a crashing trial is recorded as failed while the sweep goes
on, and an interrupted sweep resumes without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from plait.config import Config, TuneConfig, config_toml, load_config
from plait.tune.results import write_results
from plait.tune.space import parse_space
from plait.tune.sweep import Sweep, run_sweep
from plait.tune.trial import TrialRecord
from tests.tune.helpers import digits_base

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance():
    """One Ray instance for the module: starting Ray costs seconds on two cores."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_four_trials_asha_stops_early_and_writes_the_best_config(ray_instance, tmp_path):
    # Two useful learning rates first, then two far too small: their first held-out loss is far
    # above the others', so ASHA (1 evaluation of grace) stops them at its first rung.
    sweep = Sweep(digits_base(tmp_path / "run", steps=60), parse_space({}, ["train.lr=grid(2e-2, 5e-3, 1e-6, 2e-6)"]),
                  TuneConfig(trials=1, grace_period=1, reduction_factor=2), tmp_path / "sweep")
    run = run_sweep(sweep)
    assert run.errors == 0
    result = write_results(sweep)
    rows = result.rows
    assert len(rows) == 4
    by_lr = {r.point["train.lr"]: r for r in rows}
    assert set(by_lr) == {2e-2, 5e-3, 1e-6, 2e-6}
    stopped = [r for r in rows if r.status == "stopped"]
    assert stopped and all(r.steps < r.max_steps for r in stopped)
    assert by_lr[1e-6].status == "stopped" or by_lr[2e-6].status == "stopped"
    losses = [r.best_loss for r in rows]
    assert losses == sorted(losses)  # ranked, best first
    assert rows[0].point["train.lr"] in (2e-2, 5e-3) and rows[0].status == "finished"
    assert rows[0].steps == 60 and rows[0].best_loss < 1.0 < rows[-1].best_loss
    # best.toml is a plait config with the winning value, and nothing of the sweep in it
    best = load_config(result.best_config)
    assert best.train.lr == rows[0].point["train.lr"] and best.model.arch == "mlp"
    assert best.tune == TuneConfig() and "[tune" not in result.best_config.read_text()
    assert result.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.table.read_text())[0]["trial_id"] == rows[0].trial_id


def test_an_interrupted_sweep_resumes_and_a_crashing_trial_does_not_stop_it(ray_instance, tmp_path):
    # train.freeze_blocks passes the config check, but the mlp has no blocks to freeze: trials
    # with 1 or 2 raise. The first trial (0) trains; the sweep is interrupted once it is done.
    base = Config.from_dict(digits_base(tmp_path / "run", steps=40))
    base.model.n_layer = 2
    base.tune = TuneConfig(search={"train.freeze_blocks": "grid(0, 1, 2)"}, trials=1, scheduler="fifo",
                           max_concurrent=1, out_dir=str(tmp_path / "sweep"))
    path = tmp_path / "sweep.toml"
    path.write_text(config_toml(base.to_dict()))
    assert tomllib.loads(path.read_text())["tune"]["search"] == {"train.freeze_blocks": "grid(0, 1, 2)"}
    # `plait tune` on this Ray instance, interrupted (Ctrl-C) once its first trial has finished
    proc = subprocess.Popen([sys.executable, "-m", "plait.cli", "tune", str(path), "--address", ray_instance],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trials = tmp_path / "sweep" / "trials"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            records = [TrialRecord.read(p) for p in trials.glob("*")] if trials.is_dir() else []
            if any(r and r.status == "finished" for r in records):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = [r.trial_id for p in trials.glob("*") if (r := TrialRecord.read(p)) and r.status == "finished"]
    assert len(done) == 1, "the first trial did not finish before the sweep was interrupted"
    before = (trials / done[0] / "metrics.jsonl").stat().st_mtime_ns
    sweep = Sweep.load(tmp_path / "sweep")
    run = run_sweep(sweep, resume=True)
    rows = write_results(sweep).rows
    assert len(rows) == 3 and run.errors == 2
    by_value = {r.point["train.freeze_blocks"]: r for r in rows}
    assert by_value[0].trial_id == done[0] and by_value[0].status == "finished" and by_value[0].steps == 40
    assert (trials / done[0] / "metrics.jsonl").stat().st_mtime_ns == before  # not run again
    for k in (1, 2):
        assert by_value[k].status == "failed" and "freeze_blocks" in by_value[k].error
        assert by_value[k].best_loss is None
    assert rows[0] is by_value[0]
