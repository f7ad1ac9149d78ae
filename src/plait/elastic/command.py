"""`plait multiplex A.toml B.toml --nproc N`: time-slice training jobs on one set of processes.

Only argparse is imported at module level, so `plait --help` stays free of torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="two or more TOML configs, one per job")
    p.add_argument("--nproc", type=int, default=1, help="worker processes the jobs share (default 1)")
    p.add_argument("--quantum", type=int, default=10,
                   help="optimizer steps a job runs before the next one's turn (default 10)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a field in every job's config (repeatable)")
    p.add_argument("--set-job", action="append", default=[], metavar="I:SECTION.KEY=VALUE",
                   help="override a field of job I only (0-based), e.g. 1:train.out_dir=runs/b")


def load_jobs(args: argparse.Namespace):
    """The jobs' configs with their overrides, checked together (no torch)."""
    from plait.config import load_config, validate
    from plait.elastic.multiplex import check_jobs
    from plait.errors import ConfigError

    per_job: dict[int, list[str]] = {}
    for item in args.set_job:
        index, sep, override = item.partition(":")
        if not sep or not index.isdigit() or int(index) >= len(args.configs):
            raise ConfigError(f"--set-job {item!r} must be I:section.key=value with I in "
                              f"0..{len(args.configs) - 1} (the job's position)")
        per_job.setdefault(int(index), []).append(override)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be ≥ 1")
    if args.quantum < 1:
        raise ConfigError(f"--quantum {args.quantum} must be ≥ 1 (optimizer steps per turn)")
    cfgs = []
    for i, path in enumerate(args.configs):
        if Path(path).is_dir():
            raise ConfigError(f"config file {path!r} is a directory; pass a TOML file")
        cfg = load_config(path, list(args.set) + per_job.get(i, []))
        validate(cfg, args.nproc)
        cfgs.append(cfg)
    check_jobs(cfgs)
    return cfgs


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from plait.elastic.multiplex import multiplex_process
    from plait.launch import launch

    console = Console(stderr=True)
    cfgs = load_jobs(args)
    console.print(f"multiplexing {len(cfgs)} jobs on {args.nproc} processes, {args.quantum} steps a turn",
                  markup=False, highlight=False)
    results = launch(multiplex_process, ([c.to_dict() for c in cfgs], args.quantum), nproc=args.nproc,
                     log_path=Path(cfgs[0].train.out_dir) / "error.log")
    summaries = results.get(0) or next(iter(results.values()))
    table = Table("job", "config", "steps", "turns", "busy s", "switch s", "checkpoint", title="multiplexed jobs")
    for i, (path, s) in enumerate(zip(args.configs, summaries)):
        table.add_row(str(i), Text(path), str(s["step"]), str(s["slices"]), f"{s['busy_s']:.2f}",
                      f"{s['switch_s']:.3f}", Text(str(s.get("checkpoint") or "-")))
    console.print(table)
    return 0
