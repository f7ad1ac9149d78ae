"""`plait fl CONFIG`: a federated run on this machine, or the files and commands of a deployment.

Only argparse is imported at module level, so `plait --help` stays free of torch and Flower.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config with an [fl] section (see examples/fl_digits.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set fl.rounds=5 (repeatable)")
    p.add_argument("--runtime", choices=["local", "simulation"], default="local",
                   help="local: plait's in-process runner (default); simulation: Flower's simulation "
                        "runtime (Ray), same apps and seeds")
    p.add_argument("--json", metavar="PATH",
                   help="write the per-round history here (default: <train.out_dir>/fl_history.json)")
    p.add_argument("--deploy-dir", metavar="DIR",
                   help="instead of running: write a SuperLink/SuperNode deployment (Flower app, TLS "
                        "certificates, node keys) into DIR and print the commands that run it")
    p.add_argument("--port", type=int, default=9093, help="the SuperLink's port in a deployment (default 9093)")


def quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO on its own handler; keep it to errors unless -v."""
    import flwr.app  # noqa: F401  (configures Flower's logger)
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)


def load(args: argparse.Namespace):
    from plait.config import load_config
    from plait.errors import ConfigError

    cfg = load_config(args.config, list(args.set))
    if cfg.fl.clients < 2:
        raise ConfigError(f"fl.clients={cfg.fl.clients}: `plait fl` needs an [fl] section with "
                          "clients ≥ 2 (see examples/fl_digits.toml)")
    return cfg


def deploy_files(args: argparse.Namespace, cfg, config_text: str) -> tuple[Any, list[str]]:
    """Write the deployment folder for `cfg` (written out as `config_text`, TOML); returns it and
    its commands."""
    from plait.fl.deploy import prepare

    dep = prepare(config_text, args.deploy_dir, cfg.fl.clients, port=args.port)
    return dep, dep.commands()


def run(args: argparse.Namespace):
    """Run the federated job of the config; returns (config, FederatedResult, history path)."""
    import torch

    cfg = load(args)
    quiet_flower(bool(getattr(args, "verbose", False)))
    torch.set_num_threads(1)  # clients train tiny models one after another: one thread each is fastest
    if args.runtime == "simulation":
        from plait.fl.simulation import run_simulation
        result = run_simulation(cfg)
    else:
        from plait.fl.runner import run_local
        result = run_local(cfg)
    path = result.write(Path(args.json) if args.json else Path(cfg.train.out_dir) / "fl_history.json")
    return cfg, result, path
