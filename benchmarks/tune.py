"""ASHA early stopping vs running every trial to the end: 16 trials of the digits MLP.

    python benchmarks/tune.py [--quick] [--json PATH]

Both sides search the same space (train.lr loguniform, the width of a 2-layer MLP) with the same
searcher seed, so they draw the same 16 configs, and every trial trains from the same seed. One
local Ray instance (2 CPUs, one per trial) serves both; each round runs both sweeps, in
alternating order. "time_ratio" = ASHA's sweep wall time / the exhaustive sweep's (target ≤ 0.5);
"best_gap" = ASHA's best held-out loss / the exhaustive best (target ≤ 1.05); medians over rounds.
Both wall times include what any sweep pays besides training: starting one worker per CPU
(importing torch) and Ray Tune's per-trial bookkeeping (about a second per trial here), which
ASHA cannot save; the trials are long enough (2400 steps) for training to dominate. The held-out
loss is over 11 batches of 32, 352 of the 359 held-out images, so that it measures the model and
not the few easy images a smaller sample would hold.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, median, print_table, round_order, write_json  # noqa: E402

from plait.config import Config, TuneConfig  # noqa: E402
from plait.tune.results import write_results  # noqa: E402
from plait.tune.space import parse_space  # noqa: E402
from plait.tune.sweep import Sweep, run_sweep  # noqa: E402

SPACE = ["train.lr=loguniform(1e-4, 3e-2)", "model.n_embd=choice(64, 128, 256, 512)"]
TRIALS = 16


def base_config(out_dir: Path, steps: int, eval_interval: int) -> dict:
    cfg = Config.from_dict({
        "model": {"arch": "mlp", "n_layer": 2, "n_embd": 64},
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "train": {"steps": steps, "micro_batch_size": 32, "lr": 1e-2, "min_lr": 1e-5, "warmup_steps": 10,
                  "weight_decay": 0.0, "grad_clip": 0.0, "eval_interval": eval_interval,
                  "eval_batches": 11, "log_interval": eval_interval, "seed": 0, "device": "cpu",
                  "out_dir": str(out_dir)},
        "checkpoint": {"resume": "none"},
    }).to_dict()
    cfg.pop("tune")
    return cfg


def sweep_once(mode: str, root: Path, steps: int, eval_interval: int) -> dict:
    settings = TuneConfig(trials=TRIALS, scheduler=mode, searcher="random", seed=0, grace_period=1,
                          reduction_factor=4)
    sweep = Sweep(base_config(root / "run", steps, eval_interval), parse_space({}, SPACE), settings,
                  root / mode)
    t0 = time.perf_counter()
    run = run_sweep(sweep)
    wall = time.perf_counter() - t0
    rows = write_results(sweep).rows
    best = rows[0]
    return {"wall_s": wall, "best_loss": best.best_loss, "best_point": best.point, "errors": run.errors,
            "stopped": sum(r.status == "stopped" for r in rows),
            "steps_trained": sum(r.steps for r in rows),
            "points": sorted((round(r.point["train.lr"], 12), r.point["model.n_embd"]) for r in rows)}


def main() -> None:
    ap = benchmark_parser(__doc__, "300-step trials, one round (about a minute on a quiet 2-core machine)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (ASHA, exhaustive)")
    args = ap.parse_args()
    steps, eval_interval = (300, 25) if args.quick else (2400, 200)
    rounds = args.rounds or (1 if args.quick else 2)
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[dict]] = {"asha": [], "fifo": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                for mode in round_order(["asha", "fifo"], r):
                    results[mode].append(sweep_once(mode, Path(tmp) / f"r{r}", steps, eval_interval))
                    print(f"round {r} {mode}: {results[mode][-1]['wall_s']:.1f} s, best "
                          f"{results[mode][-1]['best_loss']:.4f}", file=sys.stderr)
    finally:
        ray.shutdown()
    for a, f in zip(results["asha"], results["fifo"]):
        assert a["points"] == f["points"], "the two sides drew different trials"
    time_ratio = median([a["wall_s"] / f["wall_s"] for a, f in zip(results["asha"], results["fifo"])])
    best_gap = median([a["best_loss"] / f["best_loss"] for a, f in zip(results["asha"], results["fifo"])])
    summary = {mode: {"wall_s": median([x["wall_s"] for x in xs]),
                      "best_loss": median([x["best_loss"] for x in xs]),
                      "stopped": median([x["stopped"] for x in xs]),
                      "steps_trained": median([x["steps_trained"] for x in xs]),
                      "errors": sum(x["errors"] for x in xs)} for mode, xs in results.items()}
    payload = {"time_ratio": time_ratio, "best_gap": best_gap, "targets": {"time_ratio": 0.5, "best_gap": 1.05},
               "trials": TRIALS, "steps_per_trial": steps, "eval_interval": eval_interval, "rounds": rounds,
               "space": SPACE, "summary": summary, "runs": results}
    write_json(args.json, payload)
    rows = [[mode, f"{s['wall_s']:.1f}", f"{s['best_loss']:.4f}", int(s["stopped"]), int(s["steps_trained"])]
            for mode, s in summary.items()]
    rows.append(["asha / fifo", f"{time_ratio:.3f}", f"{best_gap:.3f}", "", ""])
    print_table(f"ASHA vs every trial to the end: {TRIALS} trials, {steps} steps each, {rounds} round(s)",
                ["sweep", "wall s", "best held-out", "stopped early", "steps trained"], rows)


if __name__ == "__main__":
    main()
