"""Training on uneven hardware: one rank made 2× slower, even split vs split by measured speed.

Two jobs on 2 CPU processes (Gloo), each trained by plait's Trainer with rank 1 slowed 2× by the
testing knob (`[profile] slow_rank = 1, slow_factor = 2`: it busy-waits as long again after each
layer's forward and each backward pass):

- dp=2: the even split (each rank half of every batch) vs `profile.balance = "speed"`, which
  measures each rank's busy time over the first steps and then splits every batch in proportion
  to speed (gradients weighted by sample count, so training is unchanged);
- pp=2 (1F1B, 8 micro-batches): layers cut by the partitioner's cost alone vs cut by measured
  stage speed, so the slow stage holds fewer layers.

`"ratio"` = balanced step time / even step time (below 1 is faster; the target is ≤ 0.75 for
both). The two variants take turns round by round, in an order reversed every other round; each
run's step time is its median after its warm-up (a step ends when its slowest rank does), and the
ratio is the median over rounds of the two neighbouring runs' ratio (the ratio of the variants'
overall medians is reported too).

    python benchmarks/hetero.py [--quick] [--json benchmarks/results/hetero.json]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (benchmark_parser, median, print_table, round_order, slowest_rank_steps,  # noqa: E402
                    write_json)
from plait.testing import WorkerPool  # noqa: E402

VARIANTS = ("even", "speed")
WORDS = ("the model data rank gradient bucket tensor process step loss mesh layer token sample "
         "batch epoch reduce gather scatter parameter optimizer pipeline stage speed").split()


def _train(cfg_dict: dict, warmup: int) -> tuple[list[float], list[int] | None, list[int] | None]:
    """One run on this rank: its step times after `warmup` steps, the dp split of each draw and
    the layers per pipeline stage it ended with."""
    from plait.config import Config
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer

    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build(dp=cfg.parallel.dp, pp=cfg.parallel.pp)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    history = trainer.fit()["history"]
    partition = getattr(trainer.model, "partition", None)
    layers = [b - a for a, b in partition.bounds] if partition is not None else None
    return [h["step_time_s"] for h in history[warmup:]], trainer.perf.split, layers


def _config(job: str, variant: str, corpus: Path, out: Path, steps: int) -> dict:
    profile = {"slow_rank": 1, "slow_factor": 2.0, "slow_phase": "compute", "straggler_interval": 0,
               "balance": variant, "balance_steps": 3}
    common = {"data": {"path": str(corpus), "val_fraction": 0.05},
              "checkpoint": {"resume": "none"}, "profile": profile}
    if job == "dp":
        # Enough samples per step that forward and backward, which the split shrinks, dominate
        # the fixed costs (optimizer, all-reduce) that it does not.
        model = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
        train = dict(micro_batch_size=24, grad_accum=1)
        parallel = {"dp": 2}
    else:
        # Blocks much costlier than the head, and 6 of them: the 2:1 cut (4 | 2) is reachable.
        model = dict(n_layer=6, n_head=4, n_embd=256, block_size=32)
        train = dict(micro_batch_size=4, grad_accum=8)
        parallel = {"pp": 2, "schedule": "1f1b", "partition": "time"}
    train.update(steps=steps, warmup_steps=2, eval_interval=0, log_interval=1000, lr=1e-3,
                 out_dir=str(out))
    return {**common, "model": model, "train": train, "parallel": parallel}


def run_job(pool: WorkerPool, job: str, corpus: Path, tmp: Path, rounds: int, steps: int,
            warmup: int) -> dict:
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    layouts: dict[str, list] = {v: [] for v in VARIANTS}  # the split (dp) or layers per stage (pp)
    for i in range(rounds):
        for variant in round_order(VARIANTS, i):
            cfg = _config(job, variant, corpus, tmp / f"{job}-{variant}-{i}", steps)
            runs = pool.run(_train, cfg, warmup, timeout_s=1800)
            steps_s = slowest_rank_steps([r[0] for r in runs])
            times[variant] += steps_s
            per_round[variant].append(median(steps_s))
            layouts[variant].append(runs[0][1] if job == "dp" else runs[0][2])
    med = {v: median(t) for v, t in times.items()}
    # Each round's two runs are neighbours in time: their ratio cancels the machine's slower drifts.
    paired = [s / e for s, e in zip(per_round["speed"], per_round["even"])]
    return {"ratio": median(paired), "round_ratios": paired, "ratio_of_medians": med["speed"] / med["even"],
            "median_step_s": med, "round_median_step_s": per_round, "steps_per_variant": len(times["even"]),
            ("dp_split" if job == "dp" else "layers_per_stage"): layouts,
            "config": _config(job, "speed", corpus, tmp, steps)}


def main() -> None:
    ap = benchmark_parser(__doc__, "one round of fewer steps (under a minute)")
    args = ap.parse_args()
    rounds, steps, warmup = (1, 9, 5) if args.quick else (6, 16, 5)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rng = random.Random(0)
        corpus = tmp / "corpus.txt"
        corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(60000)) + "\n")
        with WorkerPool(2, timeout_s=1800, threads=1) as pool:
            results = {job: run_job(pool, job, corpus, tmp, rounds, steps, warmup)
                       for job in ("dp", "pp")}
    load = os.getloadavg()
    for r in results.values():  # no temporary paths in the committed result
        r["config"]["data"]["path"] = "(a generated 60,000-word corpus)"
        r["config"]["train"]["out_dir"] = "(temporary)"
    payload = {
        "benchmark": "hetero", "ratio": max(r["ratio"] for r in results.values()),
        "dp": results["dp"], "pp": results["pp"], "world_size": 2, "backend": "gloo",
        "slow_rank": 1, "slow_factor": 2.0, "quick": args.quick,
        "load_average_1_5_15": [round(x, 2) for x in load],
        "target": "dp ratio <= 0.75 and pp ratio <= 0.75",
    }
    write_json(args.json, payload)
    rows = []
    for job, r in results.items():
        med = r["median_step_s"]
        rows.append([job, f"{med['even'] * 1e3:.1f}", f"{med['speed'] * 1e3:.1f}", f"{r['ratio']:.3f}"])
    print_table(f"rank 1 slowed 2×, 2 Gloo processes (median of {results['dp']['steps_per_variant']} steps "
                f"per variant; load {load[0]:.2f})",
                ["job", "even ms", "by speed ms", "ratio"], rows)


if __name__ == "__main__":
    main()
