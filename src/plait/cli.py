"""The `plait` command: train | generate | serve | export | plan | fl | report | multiplex.

`plait --help` and `plait --version` import no torch: every command imports what it needs inside
its function. User text (messages, paths, config values) is printed literally, never read as
rich markup, so `exp[v2]` or `corpus[en].txt` show as they are.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from plait import __version__
from plait.config import Config, config_toml
from plait.errors import CheckpointError, ConfigError, PlaitError, PreemptedError

console = Console(stderr=True)


def say(message: str) -> None:
    """Print `message` on stderr as it is (no markup, no highlighting)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _config_path(path: str) -> str:
    """Refuse a folder here: the config loader would call it missing."""
    if Path(path).is_dir():
        raise ConfigError(f"config file {path!r} is a directory; pass a TOML file inside it "
                          "(e.g. examples/tiny_gpt.toml)")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from plait.config import load_config  # no torch: --print-config answers at once

    overrides = list(args.set) + (['checkpoint.resume="none"'] if args.fresh else [])
    if args.profile is not None:  # after --set: the flag wins
        overrides.append(f"profile.steps={args.profile}")
    if args.elastic is not None:
        lo, sep, hi = args.elastic.partition(":")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ConfigError(f"--elastic {args.elastic!r} must be MIN:MAX nodes (or N), e.g. --elastic 2:3")
        overrides += [f"elastic.min_nodes={lo}", f"elastic.max_nodes={hi or lo}"]
    cfg = load_config(_config_path(args.config), overrides)
    if args.print_config:
        sys.stdout.write(f"# {args.config}" + "".join(f" --set {o}" for o in overrides) + "\n"
                         + config_toml(cfg.to_dict()))
        return 0

    from plait.config import validate
    from plait.launch import resolve_device
    from plait.progress import summary_table
    from plait.train.run import load_splits, train_locally

    validate(cfg, args.nproc)
    resolve_device(cfg.train.device)  # train.device="cuda" without CUDA: refused before launch
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise CheckpointError(f"checkpoint.resume={resume!r} does not exist or is not a folder; valid: "
                              '"auto" (the newest valid checkpoint), "none" or a checkpoint folder')
    if cfg.parallel.ps.servers:
        return _train_parameter_server(cfg, args.nproc)
    if cfg.elastic.max_nodes:
        _check_elastic_launch(cfg, args.nproc)
    # Build (and cache) the corpus and check the data here, before any process starts.
    with console.status("preparing data"):
        train, val = load_splits(cfg)
    items = "images" if cfg.data.dataset == "digits" else f"sequences of {cfg.model.block_size} tokens"
    say(f"data: {len(train):,} training and {len(val):,} held-out {items}; launching {args.nproc} processes")
    try:
        if cfg.elastic.max_nodes:
            summary = _train_elastic(cfg, args.nproc)
        else:
            summary = train_locally(cfg, args.nproc)
    except PreemptedError as exc:
        return _preempted(cfg, str(exc))
    console.print(summary_table(summary))
    if summary.get("preempted"):
        return _preempted(cfg, f"preempted ({summary['preempted']})")
    return 0


def _preempted(cfg: Config, what: str) -> int:
    """Say where a preempted run stopped; its exit code (75) tells a scheduler to requeue it."""
    from plait.elastic.preemption import PREEMPTED_EXIT_CODE
    from plait.train.checkpoint import latest_valid_checkpoint

    newest = latest_valid_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
    say(f"{what}; newest checkpoint: {newest or 'none'}. Run the same command again to resume "
        f"(exit code {PREEMPTED_EXIT_CODE})")
    return PREEMPTED_EXIT_CODE


def _check_elastic_launch(cfg, nproc: int) -> None:
    """Before any data or process: the node count and the batch at every size it may take."""
    from plait.elastic.membership import check_elastic

    e = cfg.elastic
    if not e.min_nodes <= nproc <= e.max_nodes:
        raise ConfigError(f"--nproc {nproc} must be within --elastic {e.min_nodes}:{e.max_nodes} "
                          "(each process is one elastic node)")
    check_elastic(cfg)


def _train_elastic(cfg, nproc: int) -> dict:
    """`--elastic MIN:MAX`: each of the nproc processes is a node with its own elastic agent."""
    from plait.launch import ElasticJob

    e = cfg.elastic
    say(f"elastic: {nproc} nodes of 1 process ({e.min_nodes}:{e.max_nodes} allowed); node logs in "
        f"{Path(cfg.train.out_dir) / 'elastic'}")
    with ElasticJob(cfg.to_dict(), nproc, e.min_nodes, e.max_nodes, Path(cfg.train.out_dir) / "elastic") as job:
        return job.wait()


def _train_parameter_server(cfg, nproc: int) -> int:
    from plait.parallel.parameter_server.run import run_ps_job

    ps = cfg.parallel.ps
    say(f"parameter server: {ps.servers} server(s), {nproc - ps.servers} worker(s), mode {ps.mode}"
        + (f" (staleness ≤ {ps.staleness})" if ps.mode == "ssp" else ""))
    rows = run_ps_job(cfg, nproc)
    columns = ("rank", "status", "steps", "MB in", "stale", "ahead", "wait s", "held-out")
    table = Table(*columns, title=Text(f"parameter-server run ({cfg.train.out_dir}/ps)"),
                  caption="a server's steps are the updates it applied; stale and ahead are maxima")
    for r in rows:
        held_out = (f"acc {r['val_accuracy']:.3f}" if "val_accuracy" in r
                    else f"loss {r['val_loss']:.3f}" if "val_loss" in r else "-")
        table.add_row(f"{r['role']} {r['rank']}", Text(str(r.get("status", "served"))),
                      f"{r['steps'] if 'steps' in r else r.get('updates', 0):,}",
                      f"{r['bytes_received'] / 1e6:.1f}" if "bytes_received" in r else "-",
                      str(r.get("max_staleness", "-")), str(r.get("max_ahead", "-")),
                      f"{r['wait_s']:.2f}" if "wait_s" in r else "-", held_out)
    console.print(table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from plait.generate import find_checkpoint, load_model, sample
    from plait.serve.commands import generate_text

    path: str | Path = args.checkpoint
    found = None
    if not str(path).startswith("hf:"):
        try:
            found = find_checkpoint(path)
        except CheckpointError:
            if not Path(path).is_dir():
                raise
            # Not a plait checkpoint (e.g. a GPT-2 folder): the serving loader decides.
    if found is not None:
        for reason in found.skipped:
            say(f"skipped: {reason}")
        if found.skipped:  # an older checkpoint than the newest is used: say which
            used = found.server_parts or [found.path]
            say("using the newest valid checkpoint instead: " + ", ".join(str(p) for p in used))
        path = found.path
    if found is not None and found.server_parts:
        # A parameter-server run: its GPT is assembled from the servers' shards.
        model, _ = load_model(found, device=args.device)
        if args.quantize:
            from plait.serve.quantize.model import quantize_model

            quantize_model(model, args.quantize)
        text = sample(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                      args.seed, device=args.device)
    else:
        text = generate_text(path, args.prompt, args.max_new_tokens, args.temperature,
                             args.top_k, args.seed, device=args.device, quantize=args.quantize)
    sys.stdout.write(text + "\n")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from plait.serve.quantize.command import run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from plait.serve.commands import run_serve

    return run_serve(args, say)


def cmd_export(args: argparse.Namespace) -> int:
    from plait.export.command import run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from plait.profile.report import write_report  # matplotlib only here

    report = write_report(args.run_dir, args.out, args.threshold)
    sys.stdout.write(report.text)
    sys.stdout.flush()  # the summary first, then where it went (stderr)
    say(f"wrote {len(report.files)} files to {report.folder}: "
        + ", ".join(p.name for p in report.files))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from plait.plan.command import run

    out = run(args)
    if out.json_text is not None:
        sys.stdout.write(out.json_text + "\n")
    stdout = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole in a pipe
    for item in out.renderables:
        if isinstance(item, str):  # a line of text: printed as it is
            stdout.print(item, markup=False, highlight=False, soft_wrap=True)
        else:
            stdout.print(item)
    if out.emitted is not None:
        console.print(f"wrote {out.emitted}", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_fl(args: argparse.Namespace) -> int:
    from plait.fl.command import deploy_files, load, run

    if args.deploy_dir:
        cfg = load(args)
        dep, commands = deploy_files(args, cfg, config_toml(cfg.to_dict()))
        say(f"wrote a deployment of {dep.nodes} SuperNodes to {dep.root}; run, in order:")
        sys.stdout.write("\n".join(commands) + "\n")
        return 0
    with console.status("federated run"):
        cfg, result, path = run(args)
    sizes = [p["size"] for p in result.partitions]
    say(f"{cfg.fl.clients} clients ({cfg.fl.partition} partition, {min(sizes)}–{max(sizes)} items each), "
        f"strategy {cfg.fl.strategy}; history in {path}")
    table = Table("round", "held-out", "accepted", "refused", "upload MB", "ε", title=Text("federated run"))
    for row in result.history:
        held = (f"acc {row['accuracy']:.3f}" if "accuracy" in row else
                f"loss {row['loss']:.3f}" if "loss" in row else "-")
        table.add_row(str(row["round"]), held, str(row.get("accepted", "-")), str(row.get("refused", "-")),
                      f"{row['upload_wire_bytes'] / 1e6:.3f}" if "upload_wire_bytes" in row else "-",
                      f"{row['epsilon']:.2f}" if "epsilon" in row else "-")
    console.print(table)
    for row in result.history:
        for reason in row.get("refused_reasons", []):
            say(f"round {row['round']}: refused {reason}")
    return 0


def cmd_multiplex(args: argparse.Namespace) -> int:
    from plait.elastic.command import run

    return run(args)


VERBOSE_HELP = "log at INFO level, with the tracebacks of failed processes"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="distributed training of PyTorch models")
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config on N local processes")
    t.add_argument("config", help="TOML config file (see examples/)")
    t.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file + --set overrides + defaults) as TOML on "
                        "stdout and exit without starting any process")
    t.add_argument("--fresh", action="store_true",
                   help='start from step 0 even where checkpoints exist (checkpoint.resume="none"); '
                        "a checkpoint that fails verification is never overwritten: one in the way "
                        "of a save is kept as step_*.damaged")
    t.add_argument("--profile", type=int, default=None, metavar="STEPS",
                   help="trace STEPS training steps on every rank with torch.profiler, plait's phases "
                        "named (profile.steps; from step profile.start, default 2), into "
                        "OUT_DIR/profile/; read them with `plait report OUT_DIR`")
    t.add_argument("--elastic", default=None, metavar="MIN:MAX",
                   help="run elastic: each process is a node (torch elastic agent, c10d rendezvous); "
                        "the job goes on at any size in MIN:MAX as nodes leave or join")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample text from a checkpoint or run folder")
    g.add_argument("checkpoint", help="a run folder (its newest valid checkpoint; a GPT "
                                      "parameter-server run too) or a step_* folder")
    g.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    g.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to sample after the prompt (default 200)")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40,
                   help="sample from the k most likely tokens; 0 disables top-k filtering (default 40)")
    g.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same text")
    g.add_argument("--device", default="cpu", help="torch device to sample on, e.g. cpu or cuda (default cpu)")
    g.add_argument("--quantize", choices=["int8", "int4", "bf16"], default=None,
                   help="sample with reduced-bit linear weights, quantized at load (a checkpoint written by "
                        "`plait quantize` is read as it is)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument("path", help="a run folder, a step_* folder, or a Hugging Face GPT-2 folder (hf:PATH)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port; default 8000)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (or set PLAIT_API_KEY)")
    s.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    s.add_argument("--max-seqs", type=int, default=32, help="sequences decoding at once (default 32)")
    s.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per sequence per step")
    s.add_argument("--max-step-tokens", type=int, default=0,
                   help="tokens per engine step (0 = max-seqs + 2 × prefill-chunk)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429 (default 256)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--quantize", choices=["int8", "int4", "bf16"], default=None,
                   help="serve reduced-bit weights (default: as stored)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel processes per engine (default 1)")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages (processes) per engine (default 1)")
    s.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: plait's own processes (default); ray: deploy on Ray Serve")
    s.add_argument("--replicas", type=int, default=None,
                   help="engine replicas behind a router that sends each request to the least busy one, "
                        "restarts dead ones and moves their requests to live ones (default 1)")
    scale = s.add_argument_group("autoscaling (Ray Serve's autoscaling_config; any of these turns it on)")
    scale.add_argument("--min-replicas", type=int, default=None, help="fewest replicas; 0 scales to zero, the "
                       "next request then starts one (default 1)")
    scale.add_argument("--max-replicas", type=int, default=None, help="most replicas (default 1)")
    scale.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="requests in flight per replica to aim for (default 2)")
    scale.add_argument("--upscale-delay-s", type=float, default=None,
                       help="how long more replicas must be wanted before they start (default 30)")
    scale.add_argument("--downscale-delay-s", type=float, default=None,
                       help="how long fewer replicas must be wanted before some stop (default 600)")
    s.set_defaults(func=cmd_serve)

    from plait.export.command import add_arguments as export_arguments  # argparse only: no torch

    e = sub.add_parser("export", help="export a checkpoint: Hugging Face, ONNX (+ int8) or ExecuTorch")
    export_arguments(e)
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="plots and a summary of where a run's time went (needs plait[report])")
    r.add_argument("run_dir", help="a run's train.out_dir (metrics.jsonl, and profile/ when traced)")
    r.add_argument("--out", default=None, help="the folder to write (default RUN_DIR/report)")
    r.add_argument("--threshold", type=float, default=0.2,
                   help="name a rank a straggler when it is busier than the median of its peers by "
                        "more than this share (default 0.2)")
    r.set_defaults(func=cmd_report)

    from plait.plan.command import add_arguments as plan_arguments  # argparse only: no torch

    pl = sub.add_parser("plan", help="choose a dp × pp × tp layout for a model and cluster from a cost model")
    plan_arguments(pl)
    pl.set_defaults(func=cmd_plan)

    from plait.fl.command import add_arguments as fl_arguments  # argparse only: no torch, no Flower

    fl = sub.add_parser("fl", help="federated learning on Flower: a local run, or a SuperLink/SuperNode deployment")
    fl_arguments(fl)
    fl.set_defaults(func=cmd_fl)

    from plait.train.distill_command import add_arguments as distill_arguments  # argparse only
    from plait.train.distill_command import run as distill_run

    di = sub.add_parser("distill", help="train a smaller student on a trained teacher's softened outputs")
    distill_arguments(di)
    di.set_defaults(func=distill_run)

    from plait.tune.command import add_arguments as tune_arguments  # argparse only: no torch, no Ray
    from plait.tune.command import run as tune_run

    tu = sub.add_parser("tune", help="hyperparameter search on Ray Tune: parallel trials, ASHA early stopping")
    tune_arguments(tu)
    tu.set_defaults(func=tune_run)

    # Its arguments are set here, not in plait.serve.quantize.command: importing any plait.serve
    # module runs plait/serve/__init__.py, which loads the engine and torch.
    qz = sub.add_parser("quantize", help="write a checkpoint with reduced-bit weights (int8, int4, bf16) for serving")
    qz.add_argument("checkpoint", metavar="RUN_DIR",
                    help="a run folder (its newest valid checkpoint; a GPT parameter-server run too) or a "
                         "step_* checkpoint folder")
    qz.add_argument("out", metavar="OUT", help="the folder to write (must not exist)")
    qz.add_argument("--weights", required=True, metavar="FORMAT",
                    help="int8 (per output channel), int4 (in groups of --group-size inputs) or bf16")
    qz.add_argument("--group-size", type=int, default=32,
                    help="int4 only: inputs sharing one scale and offset; must divide every layer's inputs "
                         "(default 32)")
    qz.set_defaults(func=cmd_quantize)

    from plait.elastic.command import add_arguments as multiplex_arguments  # argparse only: no torch

    mx = sub.add_parser("multiplex", help="time-slice training jobs on one set of processes (step-boundary quanta)")
    multiplex_arguments(mx)
    mx.set_defaults(func=cmd_multiplex)

    # -v after the subcommand too (`plait train CFG -v`); SUPPRESS keeps a -v given before the
    # subcommand from being reset by the subcommand's default.
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PlaitError as exc:
        # The message is user text (paths, hints like "check [model]"): printed as it is.
        console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
