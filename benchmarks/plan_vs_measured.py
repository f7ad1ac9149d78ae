"""The planner's predicted step time next to the measured one, for the layouts plait runs here.

Every layout of this repository's examples and benchmarks that 1–4 CPU processes allow (data
parallelism, ZeRO 1–3, recomputation, tensor parallelism with and without sequence parallelism,
GPipe and 1F1B pipelines, and their combinations) trains the same GPT on the same global batch
through `plait.parallelize`: each step is forward and backward over the rank's micro-batches,
gradient clipping and AdamW, timed from a barrier to the slowest rank's end, 1 thread per
process. The prediction comes from `plait.plan` with "this CPU" calibrated at the start of the
run (`plait.plan.calibrate`, fresh). Layouts take turns round by round (order reversed every
other round); medians are reported.

- median_error: median over layouts of |predicted − measured| / measured (target ≤ 0.20)
- rank_agreement: over all pairs of layouts, how often the one predicted faster is the one
  measured faster (target ≥ 0.8)

    python benchmarks/plan_vs_measured.py [--quick] [--json benchmarks/results/plan_vs_measured.json]
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, median, print_table, round_order, write_json

# (name, dp, pp, tp, extra ParallelConfig fields, micro-batch size)
LAYOUTS = [
    ("dp1", 1, 1, 1, {}, 8),
    ("dp2", 2, 1, 1, {}, 8),
    ("dp2 zero1", 2, 1, 1, {"zero": 1}, 8),
    ("dp2 zero2", 2, 1, 1, {"zero": 2}, 8),
    ("dp2 zero3", 2, 1, 1, {"zero": 3}, 8),
    ("dp2 recompute", 2, 1, 1, {"recompute": "full"}, 8),
    ("tp2", 1, 1, 2, {}, 8),
    ("tp2 sp", 1, 1, 2, {"sequence_parallel": True}, 8),
    ("pp2 1f1b", 1, 2, 1, {"schedule": "1f1b", "partition": "flops"}, 4),
    ("pp2 gpipe", 1, 2, 1, {"schedule": "gpipe", "partition": "flops"}, 4),
    ("dp4", 4, 1, 1, {}, 4),
    ("dp4 zero3 recompute", 4, 1, 1, {"zero": 3, "recompute": "full"}, 4),
    ("dp2 tp2 sp", 2, 1, 2, {"sequence_parallel": True}, 8),
    ("pp2 dp2", 2, 2, 1, {"schedule": "1f1b", "partition": "params"}, 4),
    ("pp2 tp2", 1, 2, 2, {"schedule": "1f1b", "partition": "flops"}, 4),
    ("pp4 1f1b", 1, 4, 1, {"schedule": "1f1b", "partition": "flops"}, 4),
]
QUICK = ("dp1", "dp2", "dp2 zero3", "tp2", "tp2 sp", "pp2 1f1b", "dp4", "dp2 tp2 sp", "pp2 dp2", "pp4 1f1b")


def _build(model_kw: dict, layout: tuple, batch: int):
    """This rank's step function for one layout."""
    import torch
    import torch.distributed as dist

    import plait
    from plait.config import ModelConfig, ParallelConfig, TrainConfig
    from plait.mesh import ParallelMesh
    from plait.models import GPT

    _name, dp, pp, tp, extra, mb = layout
    mesh = ParallelMesh.build(dp=dp, pp=pp, tp=tp, device="cpu") if dist.is_initialized() else ParallelMesh.single()
    torch.manual_seed(0)
    model = plait.parallelize(GPT(ModelConfig(**model_kw)), mesh, ParallelConfig(dp=dp, pp=pp, tp=tp, **extra))
    optimizer = model.build_optimizer(TrainConfig())
    g = torch.Generator().manual_seed(1 + mesh.dp_rank)
    m = batch // (dp * mb)
    data = torch.randint(0, model_kw["vocab_size"], (m, mb, model_kw["block_size"] + 1), generator=g)
    micro = [(d[:, :-1], d[:, 1:]) for d in data]

    def step() -> float:
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        model.forward_backward(micro)
        model.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def _measure(model_kw: dict, layouts: list[tuple], batch: int, rounds: int, steps: int, warmup: int) -> dict:
    """Per layout: this rank's step times."""
    import torch

    torch.set_num_threads(1)
    runs = {layout[0]: _build(model_kw, layout, batch) for layout in layouts}
    for step in runs.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in round_order(list(runs), r):
            times[name] += [runs[name]() for _ in range(steps)]
    return times


def _predict(model_kw: dict, layout: tuple, batch: int, calibration: dict) -> dict:
    from plait.plan.cost import Candidate, estimate
    from plait.plan.hardware import cpu_cluster
    from plait.plan.shapes import ModelShape

    _name, dp, pp, tp, extra, mb = layout
    shape = ModelShape("bench", model_kw["n_layer"], model_kw["n_head"], model_kw["n_embd"],
                       model_kw["block_size"], model_kw["vocab_size"], dropout=model_kw["dropout"])
    cand = Candidate(dp, pp, tp, extra.get("zero", 0), mb, extra.get("schedule", "1f1b"), 1,
                     extra.get("recompute", "none"), extra.get("sequence_parallel", False),
                     extra.get("partition", "flops"))
    est = estimate(shape, cpu_cluster(calibration, dp * pp * tp, threads=1), cand, batch)
    return {"predicted_s": est.step_s, "bound": est.bound,
            "breakdown_s": {k: round(v, 6) for k, v in est.breakdown.items() if v > 0}}


def rank_agreement(pred: dict[str, float], meas: dict[str, float]) -> tuple[float, int]:
    pairs = list(itertools.combinations(sorted(pred), 2))
    agree = sum((pred[a] < pred[b]) == (meas[a] < meas[b]) for a, b in pairs)
    return agree / len(pairs), len(pairs)


def main() -> None:
    ap = benchmark_parser(__doc__, "10 layouts, a shorter sequence, fewer steps (under a minute)")
    args = ap.parse_args()
    from plait.plan.calibrate import calibrate_cpu
    from plait.testing import WorkerPool

    model_kw = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64 if args.quick else 128,
                    "vocab_size": 256, "dropout": 0.0}
    batch = 16
    rounds, steps, warmup = (2, 2, 1) if args.quick else (4, 3, 2)
    layouts = [lay for lay in LAYOUTS if not args.quick or lay[0] in QUICK]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    calibration = calibrate_cpu(threads=1, refresh=True)
    calibrate_s = time.perf_counter() - t0

    measured: dict[str, float] = {}
    fastest: dict[str, float] = {}
    by_world: dict[int, list[tuple]] = {}
    for lay in layouts:
        by_world.setdefault(lay[1] * lay[2] * lay[3], []).append(lay)
    for world, group in sorted(by_world.items()):
        if world == 1:
            per_rank = [_measure(model_kw, group, batch, rounds, steps, warmup)]
        else:
            with WorkerPool(world, timeout_s=1800, threads=1) as pool:
                per_rank = pool.run(_measure, model_kw, group, batch, rounds, steps, warmup, timeout_s=1800)
        for lay in group:
            steps_of = [max(ts) for ts in zip(*(r[lay[0]] for r in per_rank))]  # the slowest rank's
            measured[lay[0]], fastest[lay[0]] = median(steps_of), min(steps_of)

    rows, records = [], []
    for lay in layouts:
        pred = _predict(model_kw, lay, batch, calibration)
        meas, best = measured[lay[0]], fastest[lay[0]]
        err = (pred["predicted_s"] - meas) / meas
        records.append({"layout": lay[0], "dp": lay[1], "pp": lay[2], "tp": lay[3], "options": lay[4],
                        "micro_batch": lay[5], "measured_s": meas, "fastest_s": best, **pred, "error": err,
                        "error_vs_fastest": (pred["predicted_s"] - best) / best})
        rows.append([lay[0], lay[1] * lay[2] * lay[3], f"{meas * 1e3:.1f}", f"{best * 1e3:.1f}",
                     f"{pred['predicted_s'] * 1e3:.1f}", f"{100 * err:+.0f}%",
                     f"{100 * records[-1]['error_vs_fastest']:+.0f}%", pred["bound"]])
    errors = [abs(r["error"]) for r in records]
    predicted = {r["layout"]: r["predicted_s"] for r in records}
    agreement, pairs = rank_agreement(predicted, {r["layout"]: r["measured_s"] for r in records})
    agreement_fastest, _ = rank_agreement(predicted, {r["layout"]: r["fastest_s"] for r in records})
    payload = {
        "benchmark": "plan_vs_measured", "median_error": median(errors), "rank_agreement": agreement,
        "ratio": math.exp(sum(math.log(r["predicted_s"] / r["measured_s"]) for r in records) / len(records)),
        "ratio_is": "geometric mean over layouts of predicted / measured step time (no peer program here: "
                    "the planner's prediction stands where a peer's time would)",
        "pairs": pairs, "max_error": max(errors),
        "median_error_vs_fastest": median([abs(r["error_vs_fastest"]) for r in records]),
        "rank_agreement_vs_fastest": agreement_fastest,
        "measured_is": "median over rounds of each step's slowest rank; fastest: the quickest such step "
                       "(the calibration, too, keeps the fastest of its repeats)",
        "rows": records, "model": model_kw,
        "global_batch": batch, "rounds": rounds, "steps_per_round": steps, "threads_per_process": 1,
        "calibration": {k: v for k, v in calibration.items() if k != "measured_at"},
        "calibration_s": calibrate_s, "quick": args.quick,
        "target": "median_error <= 0.20; rank_agreement >= 0.8",
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    write_json(args.json, payload)
    print_table(f"predicted vs measured step time, GPT {model_kw['n_layer']}×{model_kw['n_embd']}, "
                f"{batch} × {model_kw['block_size']} tokens per step, 1 thread per process "
                f"(median error {payload['median_error']:.3f}, rank agreement {agreement:.3f} over {pairs} pairs; "
                f"against the fastest steps {payload['median_error_vs_fastest']:.3f} and {agreement_fastest:.3f})",
                ["layout", "procs", "median ms", "fastest ms", "predicted ms", "error", "vs fastest",
                 "predicted bound"], rows)


if __name__ == "__main__":
    main()
