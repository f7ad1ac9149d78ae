"""A hyperparameter sweep on Ray Tune: checked before any trial starts, then run or resumed.

    sweep = Sweep.from_config(load_config("examples/tune_digits.toml"), ["train.lr=loguniform(1e-3, 3e-2)"])
    result = run_sweep(sweep)               # a local Ray instance with this machine's CPUs
    result.rows[0]                          # the best trial; result.best_config is its TOML

Everything that can be wrong with the space is found first, with no Ray started: unknown fields,
malformed distributions, values of the wrong type, and configs that do not validate (or whose
layout needs more processes than the Ray instance has CPUs) at the corners of the space: every
listed value and both ends of each range. The sweep folder holds `sweep.json` (what was asked),
Ray's experiment state (`ray/`, which --resume restores) and one folder per trial (`trials/`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plait.config import Config, TuneConfig, validate
from plait.errors import ConfigError
from plait.tune.space import (
    Distribution,
    corner_points,
    parse_distribution,
    parse_space,
)
from plait.tune.trial import processes, trial_raw, uses_gpus

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
EXPERIMENT = "ray"  # Ray's experiment folder inside the sweep folder


@dataclass
class Sweep:
    """What to search: the base config (TOML-shaped, without [tune]), the space, the settings."""

    base: dict[str, Any]
    space: dict[str, Distribution]
    settings: TuneConfig
    out_dir: Path = field(default_factory=lambda: Path("runs/default/tune"))

    @classmethod
    def from_config(cls, cfg: Config, specs: list[str] | None = None) -> Sweep:
        """The sweep of `cfg`'s [tune] table, with `--search` specs added."""
        base = cfg.to_dict()
        base.pop("tune")
        space = parse_space(cfg.tune.search, specs)
        out = Path(cfg.tune.out_dir or str(Path(cfg.train.out_dir) / "tune"))
        return cls(base, space, cfg.tune, out)

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        spec = {"base": self.base, "search": {k: str(v) for k, v in self.space.items()},
                "settings": asdict(self.settings)}
        (self.out_dir / SWEEP_FILE).write_text(json.dumps(spec, indent=1))

    @classmethod
    def load(cls, out_dir: str | Path) -> Sweep:
        """The sweep saved in `out_dir` (what --resume continues)."""
        path = Path(out_dir) / SWEEP_FILE
        if not path.is_file():
            raise ConfigError(f"--resume: {str(out_dir)!r} holds no sweep ({SWEEP_FILE} is missing); "
                              "point tune.out_dir (--out) at the folder of the sweep to continue")
        spec = json.loads(path.read_text())
        space = {k: parse_distribution(k, v) for k, v in spec["search"].items()}
        return cls(spec["base"], space, TuneConfig(**spec["settings"]), Path(out_dir))

    @property
    def trials_dir(self) -> Path:
        return self.out_dir / "trials"


def _point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items())


def check_sweep(sweep: Sweep, cpus: int | None = None, gpus: int | None = None) -> int:
    """Raise ConfigError before any trial starts when a trial could not run; returns the most
    processes a trial needs. With `cpus` (and `gpus`), a trial needing more is refused too."""
    s = sweep.settings
    if not sweep.space:
        raise ConfigError("nothing to search: give --search FIELD=DIST(ARGS) (e.g. "
                          "--search 'train.lr=loguniform(1e-4, 1e-2)') or a [tune] search table")
    if s.searcher == "tpe":
        grids = [k for k, d in sweep.space.items() if d.kind == "grid"]
        if grids:
            raise ConfigError(f"tune.searcher=\"tpe\" draws every value itself; {grids[0]} uses grid(...): "
                              "write choice(...) instead, or use tune.searcher=\"random\"")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.searcher=\"tpe\" needs Optuna, which is not installed: "
                              "pip install plait[ray], or use tune.searcher=\"random\"") from None
    most = 0
    for point in corner_points(sweep.space):
        try:
            cfg = Config.from_dict(trial_raw(sweep.base, point, "check"))
            n = processes(cfg, s.nproc)
            validate(cfg, n)
        except ConfigError as exc:
            raise ConfigError(f"tune.search: the trial at {_point(point)} would fail: {exc}") from None
        if not cfg.train.eval_interval:
            raise ConfigError(f"tune.search: the trial at {_point(point)} never evaluates "
                              "(train.eval_interval = 0); trials are ranked by their held-out loss, "
                              "so set train.eval_interval > 0")
        if cpus is not None and n > cpus:
            raise ConfigError(f"tune.search: the trial at {_point(point)} runs {n} processes "
                              f"(one CPU each), more than the {cpus} CPUs of the Ray instance; search "
                              "smaller layouts, set tune.nproc, or give Ray more CPUs (--num-cpus, or "
                              "a cluster with --address)")
        if gpus is not None and uses_gpus(cfg, gpus > 0) and n > gpus:
            raise ConfigError(f"tune.search: the trial at {_point(point)} runs {n} processes on "
                              f"train.device={cfg.train.device!r}, one GPU each, but the Ray instance "
                              f"has {gpus} GPUs; search smaller layouts or use train.device=\"cpu\"")
        most = max(most, n)
    return most


def max_evaluations(sweep: Sweep) -> int:
    """Held-out evaluations after step 0 in the longest trial: ASHA's time budget."""
    longest = 1
    for point in corner_points(sweep.space):
        t = Config.from_dict(trial_raw(sweep.base, point, "check")).train
        longest = max(longest, math.ceil(t.steps / t.eval_interval))
    return longest


@dataclass
class SweepRun:
    """Where a finished (or resumed and finished) sweep is: see plait.tune.results."""

    sweep: Sweep
    errors: int


def run_sweep(sweep: Sweep, address: str | None = None, num_cpus: int | None = None,
              resume: bool = False) -> SweepRun:
    """Run (or with `resume`, continue) the sweep on Ray Tune and wait for every trial.

    A Ray instance already started in this process is used as it is; otherwise one is started
    (local, `num_cpus` CPUs, this machine's by default) or joined (`address`), and shut down
    afterwards. A trial that crashes is recorded as failed; the others go on.
    """
    cpus = None if address else (num_cpus or os.cpu_count() or 1)
    if address is None:
        check_sweep(sweep, _running_cpus() or cpus)
    import ray

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        check_sweep(sweep, int(resources.get("CPU", 0)), gpus)
        return SweepRun(sweep, _fit(sweep, resume, gpus > 0))
    finally:
        if started:
            ray.shutdown()


def _running_cpus() -> int | None:
    """CPUs of a Ray instance this process already started, if any (without importing Ray)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return int(ray.cluster_resources().get("CPU", 0))


def _fit(sweep: Sweep, resume: bool, gpus: bool) -> int:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from plait.tune.trainable import run_trial, trial_resources

    out = sweep.out_dir.resolve()
    experiment = out / EXPERIMENT
    trainable = tune.with_resources(run_trial, trial_resources)
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"--resume: {str(sweep.out_dir)!r} holds no Ray Tune experiment to "
                              "continue; start the sweep without --resume")
        log.info("resuming the sweep in %s", out)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        if experiment.exists():
            raise ConfigError(f"tune.out_dir={str(sweep.out_dir)!r} already holds a sweep; continue "
                              "it with --resume, or choose another folder (--out)")
        sweep.save()
        s = sweep.settings
        scheduler = None
        if s.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_evaluations(sweep) + 1,
                                      grace_period=s.grace_period, reduction_factor=s.reduction_factor)
        param_space = {"search": {k: d.to_ray() for k, d in sweep.space.items()},
                       "plait": {"base": sweep.base, "nproc": s.nproc, "gpus": gpus,
                                 "trials_dir": str(sweep.trials_dir.resolve())}}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler,
                                        search_alg=_searcher(s), num_samples=s.trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0),
        )
    grid = tuner.fit()
    return grid.num_errors


def _searcher(s: TuneConfig) -> Any:
    if s.searcher == "tpe":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        from ray.tune.search import ConcurrencyLimiter

        tpe = OptunaSearch(sampler=TPESampler(seed=s.seed))
        return ConcurrencyLimiter(tpe, s.max_concurrent) if s.max_concurrent else tpe
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=s.seed)
