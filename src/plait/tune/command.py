"""`plait tune CONFIG --search FIELD=DIST --trials N`: a hyperparameter sweep on Ray Tune.

Importing this module imports neither torch nor Ray (`plait --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from plait.config import TUNE_SCHEDULERS, TUNE_SEARCHERS

# Flags that set a [tune] field: (flag, field, type).
FLAGS = (("--trials", "trials", int), ("--scheduler", "scheduler", str), ("--searcher", "searcher", str),
         ("--grace-period", "grace_period", int), ("--reduction-factor", "reduction_factor", int),
         ("--max-concurrent", "max_concurrent", int), ("--nproc", "nproc", int),
         ("--seed", "seed", int), ("--out", "out_dir", str))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `plait tune` flags (argparse only)."""
    p.add_argument("config", help="TOML config file of the run to tune (its [tune] table too)")
    p.add_argument("--search", action="append", default=[], metavar="FIELD=DIST(ARGS)",
                   help="search a config field (repeatable): uniform(lo, hi), loguniform(lo, hi), "
                        "randint(lo, hi), choice(a, b, ...), grid(a, b, ...); e.g. "
                        "--search 'train.lr=loguniform(1e-4, 1e-2)' --search 'parallel.zero=choice(0, 1, 2)'")
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="samples of the space (tune.trials; each grid point gets N)")
    p.add_argument("--scheduler", choices=TUNE_SCHEDULERS, default=None,
                   help="asha: stop unpromising trials early (default); fifo: every trial to the end")
    p.add_argument("--searcher", choices=TUNE_SEARCHERS, default=None,
                   help="random: random draws and grid points (default); tpe: Optuna's TPE (needs optuna)")
    p.add_argument("--grace-period", type=int, default=None, metavar="EVALS",
                   help="asha: evaluations every trial gets before it may be stopped (default 1)")
    p.add_argument("--reduction-factor", type=int, default=None, metavar="R",
                   help="asha: about 1 in R trials goes on at each rung (default 3)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="trials at once (default: as many as the CPUs allow)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per trial (default: the layout's, dp × pp × tp)")
    p.add_argument("--seed", type=int, default=None, help="the searcher's seed (default 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the sweep folder (default: train.out_dir/tune)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field of every trial, e.g. --set train.steps=300 (repeatable)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local instance")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: this machine's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in the sweep folder; finished trials are not rerun")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    for flag, name, kind in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out.append(f"tune.{name}={value if kind is int else json.dumps(value)}")
    return out


def run(args: argparse.Namespace) -> int:
    """Check, run (or resume) the sweep, then print the ranked table and say what was written."""
    from plait.config import load_config
    from plait.tune.results import write_results
    from plait.tune.sweep import Sweep, check_sweep, run_sweep

    err = Console(stderr=True)
    # Ray Tune's new console output prints its own tables on stdout whatever the verbosity; the
    # classic reporter at verbosity 0 (run_sweep's) stays quiet, leaving stdout to the results.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cfg = load_config(args.config, _overrides(args))
    sweep = Sweep.from_config(cfg, args.search)
    if args.resume:
        sweep = Sweep.load(sweep.out_dir)
        err.print(f"resuming the sweep in {sweep.out_dir} (its saved search space and settings)",
                  markup=False, highlight=False)
    else:
        check_sweep(sweep)  # the space, before anything starts (CPUs are checked once Ray is up)
    s = sweep.settings
    err.print(f"{s.trials} trials × {', '.join(f'{k}={v}' for k, v in sweep.space.items())}; scheduler "
              f"{s.scheduler}, searcher {s.searcher}; folder {sweep.out_dir}", markup=False, highlight=False)
    with err.status("sweeping"):
        outcome = run_sweep(sweep, address=args.address, num_cpus=args.num_cpus, resume=args.resume)
    result = write_results(sweep)
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(results_table(result))
    for row in result.rows:
        if row.status == "failed":
            err.print(Text(f"trial {row.trial_id} failed: {row.error}"), soft_wrap=True)
    written = [p for p in (result.best_config, result.curves, result.table) if p is not None]
    err.print(f"wrote {', '.join(str(p) for p in written)}", markup=False, highlight=False, soft_wrap=True)
    if result.best_config is not None:
        err.print(f"train the best config with: plait train {result.best_config}", markup=False,
                  highlight=False, soft_wrap=True)
    if outcome.errors:
        err.print(f"{outcome.errors} trial(s) failed; the others are ranked above", markup=False,
                  highlight=False)
    return 0 if result.best is not None else 1


def results_table(result) -> Table:
    """The trials best first: what differs from the base config, best held-out loss, steps, time."""
    table = Table(title=Text(f"sweep {result.out_dir}: {len(result.rows)} trials"),
                  caption="stopped: ended early by the scheduler; steps: the last evaluated step")
    for name, justify in (("#", "right"), ("trial", "left"), ("config", "left"), ("held-out loss", "right"),
                          ("steps", "right"), ("wall s", "right"), ("status", "left")):
        table.add_column(name, justify=justify)
    for i, r in enumerate(result.rows, 1):
        diff = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.point.items())
        table.add_row(str(i), Text(r.trial_id), Text(diff),
                      f"{r.best_loss:.4f}" if r.best_loss is not None else "-",
                      f"{r.steps}/{r.max_steps}", f"{r.wall_s:.1f}", Text(r.status))
    return table
