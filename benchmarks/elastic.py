"""Elastic training: how fast a job recovers from a lost worker, and what multiplexing costs.

- recovery_s: a local elastic job of 3 one-process nodes (`--elastic 2:3`, tiny GPT, a checkpoint
  every step) → SIGKILL to one worker → seconds until the job trains again at 2 (the first step
  of the new round is written). It covers Gloo noticing the dead peer, the killed worker's node
  leaving, the rendezvous re-forming (1 s last call), new workers (spawned: Python and torch
  start again), rebuilding the model and loading the checkpoint. Target ≤ 15 s on 2 cores.
- lost_steps: steps finished before the kill that the job had to train again (newest completed
  step at the kill − the step the new round resumed from). Target ≤ 1.
- multiplex_overhead: wall time of two jobs (2-layer GPT, 64 wide) time-sliced by plait's
  multiplexer (quantum 10 steps, `plait multiplex`'s default; the idle job's state moved off the
  device) / the same two jobs run back to back, both on the
  same warm Gloo pool of 2 processes (start-up and first imports not counted on either side),
  alternating which side runs first; the median of the per-round ratios. Target ≤ 1.10.
- ckpt_overhead, migration_s: from benchmarks/elastic_checkpoint.py's measure(), when that file
  is present (see there).

    python benchmarks/elastic.py [--quick] [--json benchmarks/results/elastic.json]
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import benchmark_parser, median, print_table, round_order, write_json

WORDS = ["the", "model", "data", "rank", "gradient", "bucket", "tensor", "process", "step", "loss", "mesh", "layer", "token", "sample"]


def _corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        rng = random.Random(0)
        path.write_text(" ".join(rng.choice(WORDS) for _ in range(20000)) + "\n")
    return path


def _config(folder: Path, out: str, steps: int, **sections: Any) -> dict[str, Any]:
    raw = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": {"path": str(_corpus(folder)), "val_fraction": 0.1},
        "train": {"steps": steps, "micro_batch_size": 4, "warmup_steps": 2, "eval_interval": 0,
                  "log_interval": 1, "out_dir": str(folder / out), "lr": 1e-3, "device": "cpu"},
        "checkpoint": {"resume": "auto", "interval": 1, "keep": 3},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def recovery(folder: Path, steps: int, kill_after: int) -> dict[str, float]:
    """One elastic job of 3 nodes that loses a worker after `kill_after` steps."""
    from plait.elastic.membership import read_rounds, read_workers
    from plait.launch import ElasticJob
    from plait.train.metrics import read_metrics

    run = folder / "run"
    cfg = _config(folder, "run", steps, elastic={"global_batch": 24, "timeout_s": 30})
    with ElasticJob(cfg, nodes=3, min_nodes=2, max_nodes=3, work_dir=folder / "job") as job:
        while not ((m := read_metrics(run)) and m[-1]["step"] >= kill_after):
            if all(p.poll() is not None for p in job.nodes):
                raise RuntimeError(f"the job ended before step {kill_after}; see {folder / 'job'}")
            time.sleep(0.02)
        victim = read_workers(run)[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        done_at_kill = read_metrics(run)[-1]["step"]
        while True:
            rounds = read_rounds(run)
            if len(rounds) >= 2 and any(r["step"] > rounds[1]["step"] for r in read_metrics(run)):
                back = time.monotonic()
                break
            if all(p.poll() is not None for p in job.nodes):
                raise RuntimeError(f"the job ended without a second round; see {folder / 'job'}")
            time.sleep(0.02)
        summary = job.wait(300)
    assert summary["step"] == steps and rounds[1]["world_size"] == 2, (summary, rounds)
    return {"recovery_s": back - killed, "lost_steps": done_at_kill - rounds[1]["step"]}


def _alone(cfg_dicts: list[dict]) -> float:
    import torch.distributed as dist

    from plait.config import Config
    from plait.mesh import ParallelMesh
    from plait.train.run import load_splits
    from plait.train.trainer import Trainer

    mesh = ParallelMesh.build(device="cpu")
    dist.barrier()
    t0 = time.perf_counter()
    for d in cfg_dicts:
        cfg = Config.from_dict(d)
        Trainer(cfg, mesh, *load_splits(cfg)).fit()
    dist.barrier()
    return time.perf_counter() - t0


def _multiplexed(cfg_dicts: list[dict], quantum: int) -> float:
    import torch.distributed as dist

    from plait.config import Config
    from plait.elastic.multiplex import run_multiplexed
    from plait.mesh import ParallelMesh

    mesh = ParallelMesh.build(device="cpu")
    dist.barrier()
    t0 = time.perf_counter()
    run_multiplexed([Config.from_dict(d) for d in cfg_dicts], mesh, quantum)
    dist.barrier()
    return time.perf_counter() - t0


def multiplex(folder: Path, steps: int, rounds: int, quantum: int = 10) -> dict[str, Any]:
    from plait.testing import WorkerPool

    times: dict[str, list[float]] = {"multiplexed": [], "back_to_back": []}
    with WorkerPool(2, timeout_s=600) as pool:
        # Warm-up, not timed: the first run in a process pays for importing plait's modules.
        warm = [_config(folder, f"warm-{j}", 3, checkpoint={"resume": "none", "interval": 0}) for j in range(2)]
        pool.run(_multiplexed, warm, 1)
        for i in range(rounds):
            for side in round_order(("multiplexed", "back_to_back"), i):
                jobs = [_config(folder, f"{side}-{i}-{j}", steps, checkpoint={"resume": "none", "interval": 0},
                                train={"seed": j}, model={"n_embd": 64, "block_size": 64}) for j in range(2)]
                if side == "multiplexed":
                    times[side].append(max(pool.run(_multiplexed, jobs, quantum)))
                else:
                    times[side].append(max(pool.run(_alone, jobs)))
    ratios = [a / b for a, b in zip(times["multiplexed"], times["back_to_back"])]
    return {"multiplex_overhead": median(ratios), "multiplexed_s": times["multiplexed"],
            "back_to_back_s": times["back_to_back"], "quantum": quantum, "steps_per_job": steps}


def main() -> None:
    ap = benchmark_parser(__doc__, "one recovery, 2 multiplexing rounds of short jobs (about a minute)")
    args = ap.parse_args()
    trials, steps, mux_rounds, mux_steps = (1, 16, 2, 20) if args.quick else (3, 24, 5, 40)
    rec = []
    with tempfile.TemporaryDirectory(prefix="plait-elastic-bench-") as tmp:
        for t in range(trials):
            rec.append(recovery(Path(tmp) / f"recovery-{t}", steps, kill_after=4 + t))
        mux = multiplex(Path(tmp), mux_steps, mux_rounds)
    payload: dict[str, Any] = {
        "benchmark": "elastic", "quick": args.quick,
        "recovery_s": median([r["recovery_s"] for r in rec]),
        "lost_steps": max(r["lost_steps"] for r in rec),
        "recovery_trials": rec,
        "multiplex_overhead": mux["multiplex_overhead"], "multiplex": mux,
    }
    if (Path(__file__).resolve().parent / "elastic_checkpoint.py").is_file():
        import elastic_checkpoint  # the other half of the elastic benchmarks, when present

        payload.update(elastic_checkpoint.measure(args.quick))
    else:
        payload["note"] = "benchmarks/elastic_checkpoint.py absent: ckpt_overhead and migration_s left out"
    write_json(args.json, payload)
    rows = [["recovery_s (kill → training at 2 of 3)", f"{payload['recovery_s']:.2f}", "≤ 15"],
            ["lost_steps", str(payload["lost_steps"]), "≤ 1"],
            ["multiplex_overhead", f"{payload['multiplex_overhead']:.3f}", "≤ 1.10"]]
    for key, target in (("ckpt_overhead", "≤ 1.05"), ("migration_s", "-")):
        if key in payload:
            rows.append([key, f"{payload[key]:.3f}", target])
    print_table(f"elastic training ({trials} recoveries, {mux_rounds} multiplexing rounds, "
                f"{'quick' if args.quick else 'full'})", ["metric", "value", "target"], rows)


if __name__ == "__main__":
    main()
