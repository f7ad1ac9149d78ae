"""The Ray Tune trainable: one plait training run per trial, reporting its held-out loss.

A one-process layout trains inside the trial's Ray actor (plait's Trainer, the same as one
`plait train` process). Any other layout, and parameter-server runs, go through `plait train
--nproc N` in a child process group, whose metrics.jsonl is followed for held-out losses; the
trial reserves N CPUs. Each evaluation after step 0 is one `ray.tune.report` ("loss", "step"),
so ASHA's rungs count evaluations. When the scheduler stops a trial, Ray ends the trial's thread
inside that report (SystemExit); the child processes are then killed and the trial is recorded
as stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.config import Config, config_toml, validate
from plait.errors import LaunchError
from plait.launch import one_line
from plait.tune.trial import (
    TrialRecord,
    held_out_curve,
    processes,
    trial_raw,
    uses_gpus,
)

Report = Callable[[int, float], None]
POLL_S = 0.2


def trial_config(config: dict[str, Any], folder: str | Path) -> tuple[Config, int]:
    """The Config and process count of the trial whose Ray config is `config`."""
    setup = config["plait"]
    cfg = Config.from_dict(trial_raw(setup["base"], config.get("search", {}), folder))
    return cfg, processes(cfg, setup["nproc"])


def trial_resources(config: dict[str, Any]) -> Any:
    """Ray resources of a trial: one CPU per process of its layout, and one GPU each on GPUs."""
    from ray.tune import PlacementGroupFactory

    cfg, nproc = trial_config(config, "unused")
    bundle = {"CPU": nproc}
    if uses_gpus(cfg, config["plait"].get("gpus", False)):
        bundle["GPU"] = nproc
    return PlacementGroupFactory([bundle])


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one sample of the search space, reporting as it goes."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    folder = Path(config["plait"]["trials_dir"]) / trial_id
    cfg, nproc = trial_config(config, folder)
    point = dict(config.get("search", {}))
    done = TrialRecord.read(folder)
    if done is not None and done.status == "finished" and done.point == point:
        # Finished just before the sweep was interrupted, before Ray took note: not run again.
        for step, loss in done.extra.get("reported", []):
            tune.report({"loss": loss, "step": step})
        return
    record = TrialRecord(trial_id, point, nproc, max_steps=cfg.train.steps)
    record.write(folder)
    reported: list[tuple[int, float]] = []  # the run's metrics miss a report the trial was stopped in
    record.extra["reported"] = reported

    t0 = time.perf_counter()

    def report(step: int, loss: float) -> None:
        reported.append((step, loss))
        record.wall_s = time.perf_counter() - t0
        record.write(folder)  # kept up to date: Ray may end a stopped trial's actor at any time
        tune.report({"loss": loss, "step": step})

    try:
        validate(cfg, nproc)
        if nproc == 1 and not cfg.parallel.ps.servers:
            _train_here(cfg, report)
        else:
            _train_launched(cfg, nproc, folder, report)
        record.status = "finished"
    except SystemExit:  # the scheduler stopped this trial
        record.status = "finished" if reported and reported[-1][0] >= cfg.train.steps else "stopped"
        raise
    except BaseException as exc:
        record.status, record.error = "failed", one_line(exc)
        raise
    finally:
        record.wall_s = time.perf_counter() - t0
        record.write(folder)


def _train_here(cfg: Config, report: Report) -> None:
    """One process: the Trainer in this actor, reporting from its evaluation callback."""
    from plait.launch import resolve_device
    from plait.mesh import ParallelMesh
    from plait.train.run import load_splits
    from plait.train.trainer import Callbacks, Trainer

    train, val = load_splits(cfg)
    mesh = ParallelMesh.single(resolve_device(cfg.train.device))

    def on_eval(record: dict[str, Any]) -> None:
        if record["step"] > 0:  # step 0 is the untrained model: nothing to rank trials by
            report(record["step"], record["val_loss"])

    Trainer(cfg, mesh, train, val, Callbacks(on_eval=on_eval)).fit()


def _train_launched(cfg: Config, nproc: int, folder: Path, report: Report) -> None:
    """Several processes: `plait train --nproc N` in its own process group, followed through the
    run's metrics.jsonl; killed with its children when the trial stops."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "trial.toml"
    config_path.write_text(config_toml(cfg.to_dict()))
    log_path = folder / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "plait.cli", "train", str(config_path),
                                 "--nproc", str(nproc)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    reported = 0
    try:
        while True:
            done = proc.poll() is not None
            for step, loss in held_out_curve(folder):
                if step > reported:
                    reported = step
                    report(step, loss)
            if done:
                break
            time.sleep(POLL_S)
        if proc.returncode != 0:
            raise LaunchError(f"plait train --nproc {nproc} exited with code {proc.returncode}: "
                              f"{_error_lines(log_path)} (log: {log_path})")
    finally:
        _kill_group(proc)


def _error_lines(log_path: Path) -> str:
    """The CLI's error message (after "error:") from a run's log, else its last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            return " ".join([line.removeprefix("error:").strip(), *lines[i + 1:i + 3]])
    return lines[-1] if lines else "no output"


def _kill_group(proc: subprocess.Popen) -> None:
    """End the launched run and every process it started (they share its process group) at once:
    a stopped trial needs no final checkpoint, and Ray may end this actor soon after."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the run ended and took its processes with it
        pass
    try:
        proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        pass
