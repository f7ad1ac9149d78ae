"""The `plait` command: train | generate."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from plait.errors import PlaitError

console = Console(stderr=True)


def cmd_train(args: argparse.Namespace) -> int:
    from plait.config import load_config, validate
    from plait.data.dataset import load_token_splits
    from plait.launch import launch
    from plait.train.run import train_process

    cfg = load_config(args.config, args.set)
    validate(cfg, args.nproc)
    if cfg.parallel.ps.servers:
        return _train_parameter_server(cfg, args.nproc)
    # Build (and cache) the corpus and check the data here, before any process starts.
    with console.status("preparing data"):
        train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction,
                                       cfg.data.cache_dir or None)
    console.print(f"data: {len(train):,} training and {len(val):,} held-out sequences of "
                  f"{cfg.model.block_size} tokens; launching {args.nproc} processes")
    results = launch(train_process, (cfg.to_dict(), True), nproc=args.nproc)
    summary = results.get(0) or next(iter(results.values()))
    table = Table(title="run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", str(summary["step"]))
    if summary.get("final_val_loss") is not None:
        table.add_row("held-out loss", f"{summary['final_val_loss']:.4f}")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:,.0f}")
    table.add_row("checkpoint", str(summary.get("checkpoint") or "-"))
    console.print(table)
    return 0


def _train_parameter_server(cfg, nproc: int) -> int:
    from plait.train.ps_run import run_ps_job

    ps = cfg.parallel.ps
    console.print(f"parameter server: {ps.servers} server(s), {nproc - ps.servers} worker(s), mode {ps.mode}"
                  + (f" (staleness ≤ {ps.staleness})" if ps.mode == "ssp" else ""))
    rows = run_ps_job(cfg, nproc)
    columns = ("rank", "status", "steps", "MB in", "stale", "ahead", "wait s", "held-out")
    table = Table(*columns, title=f"parameter-server run ({cfg.train.out_dir}/ps)",
                  caption="a server's steps are the updates it applied; stale and ahead are maxima")
    for r in rows:
        held_out = (f"acc {r['val_accuracy']:.3f}" if "val_accuracy" in r
                    else f"loss {r['val_loss']:.3f}" if "val_loss" in r else "-")
        table.add_row(f"{r['role']} {r['rank']}", r.get("status", "served"),
                      f"{r['steps'] if 'steps' in r else r.get('updates', 0):,}",
                      f"{r['bytes_received'] / 1e6:.1f}" if "bytes_received" in r else "-",
                      str(r.get("max_staleness", "-")), str(r.get("max_ahead", "-")),
                      f"{r['wait_s']:.2f}" if "wait_s" in r else "-", held_out)
    console.print(table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from plait.generate import load_model, sample

    model, _ = load_model(args.checkpoint, device=args.device)
    text = sample(model, args.prompt, args.max_new_tokens, args.temperature,
                  args.top_k or None, args.seed, device=args.device)
    sys.stdout.write(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="distributed training of PyTorch models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config on N local processes")
    t.add_argument("config", help="TOML config file (see examples/)")
    t.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample text from a checkpoint or run folder")
    g.add_argument("checkpoint", help="a run folder (newest valid checkpoint) or a step_* folder")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40, help="0 disables top-k filtering")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PlaitError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False, markup=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
