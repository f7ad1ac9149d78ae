"""`plait distill CONFIG --teacher RUN_DIR`: train a student on a teacher's softened outputs.

The student is CONFIG's model (usually fewer blocks or narrower than the teacher); it trains like
`plait train` would train it, on N local processes under any data-parallel layout, with the
distillation loss of :mod:`plait.train.distill`. Only argparse is imported at module level, so
`plait --help` stays free of torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config of the student (see examples/; its [distill] "
                                  "section, or the options below, name the teacher)")
    p.add_argument("--teacher", metavar="RUN_DIR",
                   help="the trained teacher: a run folder (its newest valid checkpoint) or a "
                        "step_* folder (distill.teacher)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softening temperature T of both models' outputs (distill.temperature, default 2.0)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the teacher's term; 1 - alpha weighs the cross-entropy on the data "
                        "(distill.alpha, default 0.5)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set model.n_layer=2 (repeatable)")
    p.add_argument("--fresh", action="store_true",
                   help='start from step 0 even where checkpoints exist (checkpoint.resume="none")')


def overrides(args: argparse.Namespace) -> list[str]:
    """--set overrides, then the flags (which win over --set and the file)."""
    out = list(args.set)
    if args.fresh:
        out.append('checkpoint.resume="none"')
    if args.teacher is not None:
        out.append(f"distill.teacher={json.dumps(args.teacher)}")  # a TOML string, whatever the path
    for name in ("temperature", "alpha"):
        value = getattr(args, name)
        if value is not None:
            out.append(f"distill.{name}={value!r}")
    return out


def run(args: argparse.Namespace) -> int:
    """Check the config and the teacher here, then train the student on `--nproc` processes."""
    from rich.console import Console

    from plait.config import load_config, validate
    from plait.errors import CheckpointError, ConfigError
    from plait.launch import resolve_device
    from plait.progress import summary_table
    from plait.train.distill import load_teacher
    from plait.train.run import load_splits, train_locally

    console = Console(stderr=True)

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False, soft_wrap=True)

    if Path(args.config).is_dir():
        raise ConfigError(f"config file {args.config!r} is a directory; pass a TOML file")
    cfg = load_config(args.config, overrides(args))
    if not cfg.distill.teacher:
        raise ConfigError("plait distill needs a teacher: pass --teacher RUN_DIR (a trained run folder "
                          "or a step_* folder) or set distill.teacher in the config")
    validate(cfg, args.nproc)
    resolve_device(cfg.train.device)
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise CheckpointError(f"checkpoint.resume={resume!r} does not exist or is not a folder; valid: "
                              '"auto" (the newest valid checkpoint), "none" or a checkpoint folder')
    # The teacher is read and checked once here, before any process starts.
    with console.status("checking the teacher"):
        teacher, teacher_cfg = load_teacher(cfg, "cpu")
        teacher_params = sum(p.numel() for p in teacher.parameters())
        del teacher
        train, val = load_splits(cfg)
    tm, sm = teacher_cfg.model, cfg.model
    say(f"teacher {cfg.distill.teacher}: {tm.n_layer} blocks × {tm.n_embd} ({teacher_params:,} "
        f"parameters); student: {sm.n_layer} blocks × {sm.n_embd}; T={cfg.distill.temperature}, "
        f"alpha={cfg.distill.alpha}")
    say(f"data: {len(train):,} training and {len(val):,} held-out sequences of {sm.block_size} "
        f"tokens; launching {args.nproc} processes")
    summary = train_locally(cfg, args.nproc)
    console.print(summary_table(summary, "distillation summary", "student held-out loss"))
    return 0
