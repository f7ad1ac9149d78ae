"""plait's GPipe and 1F1B pipelines vs torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B).

Same GPT, same stage split (plait's partition, balanced by FLOPs), same micro-batches, CPU Gloo,
pp = 2 and 4. Each round runs every variant once, plait and torch side by side in alternating
order (plait first on even rounds, torch first on odd ones, so neither side always inherits the
other's warm heap and caches); each reports the median step time (forward + backward of all
micro-batches; a step ends when its slowest rank does). plait's step is its full
`forward_backward`, including the tied embedding/head gradient sum and the loss shared with
every rank, which torch's stages do not do; "sched-only" counts only the time inside plait's
schedule (the same work as torch's step). A row's ratio is the median of side-by-side step ratios
(`paired_ratio`: plait's and torch's step of the same round), which a shared machine's drifting
load does not move; the ratio of the two medians is kept next to it.

plait's measured bubble (each stage's idle share of the pipelined step, 1 − compute / step span,
averaged over stages, read on the first stage) is printed next to two theories: the closed form
(p−1)/(m+p−1), for equal stages and free communication, and "model", the same schedule replayed
with the durations the step's actions really took and free communication. Measured − model is
what transfers and the runtime added; model − closed form is what unequal and uneven stage
compute added. The model is 256 wide so that a stage's compute dwarfs the per-micro-batch costs
that do not grow with width (the head's share, transfer latency), as it does at real scale.

    python benchmarks/pp_vs_torch.py [--quick] [--json benchmarks/results/pp_vs_torch.json]
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (benchmark_parser, median, paired_ratio, print_table, round_order,  # noqa: E402
                    slowest_rank_steps, write_json)
from plait.config import ModelConfig  # noqa: E402
from plait.testing import WorkerPool  # noqa: E402

SCHEDULES = ("gpipe", "1f1b")


def _bench(model_kw: dict, micro_batch: int, ms: list[int], rounds: int, warmup: int) -> dict:
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from plait.config import ParallelConfig
    from plait.mesh import ParallelMesh
    from plait.models import GPT
    from plait.parallel.pipeline import pipeline_spec
    from plait.parallel.pipeline.model import PipelineParallelModel

    cfg = ModelConfig(**model_kw)
    world = dist.get_world_size()
    mesh = ParallelMesh.build(pp=world)
    rank, last = mesh.pp_rank, world - 1
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    steps: dict[str, callable] = {}
    for schedule in SCHEDULES:
        torch.manual_seed(0)
        ours = PipelineParallelModel(GPT(cfg), mesh, ParallelConfig(pp=world, schedule=schedule,
                                                                    partition="flops"))
        torch.manual_seed(0)
        theirs_spec = pipeline_spec(GPT(cfg))
        chunk = nn.Sequential(*(theirs_spec.layers[i].module for i in range(*ours.partition.bounds[rank])))
        for m in ms:
            data = torch.randint(0, cfg.vocab_size, (m * micro_batch, cfg.block_size + 1), generator=g)
            x, y = data[:, :-1], data[:, 1:]
            batches = list(zip(x.split(micro_batch), y.split(micro_batch)))
            stage = PipelineStage(chunk, rank, world, mesh.device, group=mesh.pp_group)
            kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            peer = kind(stage, n_microbatches=m, loss_fn=theirs_spec.loss_fn)

            def ours_step(ours=ours, batches=batches):
                ours.forward_backward(batches)
                ours.zero_grad(set_to_none=True)
                stats = ours.last_stats
                # (mean bubble over stages, this rank's time inside the schedule, stage imbalance,
                #  bubble of the step's own action times replayed with free communication)
                metrics = ours.step_metrics()
                compute = metrics["pp_compute_s"]
                return (metrics["bubble"], stats[rank].compute_s + stats[rank].wait_s,
                        max(compute) / min(compute), metrics["bubble_model"])

            def torch_step(peer=peer, x=x, y=y, chunk=chunk):
                if rank == 0:
                    peer.step(x)
                elif rank == last:
                    peer.step(target=y, losses=[], return_outputs=False)
                else:
                    peer.step()
                chunk.zero_grad(set_to_none=True)
                return None

            steps[f"plait-{schedule}-{m}"] = ours_step
            steps[f"torch-{schedule}-{m}"] = torch_step

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        bubble = fn()
        return time.perf_counter() - t0, bubble

    for fn in steps.values():
        for _ in range(warmup):
            timed(fn)
    times = {k: [] for k in steps}
    bubbles, schedule_only, imbalance, modelled = ({k: [] for k in steps} for _ in range(4))
    for i in range(rounds):
        for m in ms:
            for schedule in SCHEDULES:
                for side in round_order(("plait", "torch"), i):  # A B, B A, ...
                    k = f"{side}-{schedule}-{m}"
                    t, extra = timed(steps[k])
                    times[k].append(t)
                    if extra is not None:
                        bubbles[k].append(extra[0])
                        schedule_only[k].append(extra[1])
                        imbalance[k].append(extra[2])
                        modelled[k].append(extra[3])
    return {"times": times, "bubbles": bubbles, "schedule_only": schedule_only, "imbalance": imbalance,
            "modelled": modelled}


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer rounds, m = 4 only (under a minute)")
    args = ap.parse_args()
    if args.quick:
        model_kw = dict(n_layer=8, n_head=4, n_embd=64, block_size=64, dropout=0.0)
        micro_batch, ms, rounds, warmup = 4, [4], 3, 1
    else:
        model_kw = dict(n_layer=8, n_head=4, n_embd=256, block_size=64, dropout=0.0)
        micro_batch, ms, rounds, warmup = 4, [4, 8], 16, 2
    load_before = os.getloadavg()
    cpus = len(os.sched_getaffinity(0))
    rows, records = [], []
    for pp in (2, 4):
        with WorkerPool(pp, timeout_s=1800, threads=1) as pool:
            per_rank = pool.run(_bench, model_kw, micro_batch, ms, rounds, warmup, timeout_s=1800)
        for m in ms:
            for schedule in SCHEDULES:
                ours_k, peer_k = f"plait-{schedule}-{m}", f"torch-{schedule}-{m}"
                steps = {k: slowest_rank_steps([r["times"][k] for r in per_rank]) for k in (ours_k, peer_k)}
                step = {k: median(v) for k, v in steps.items()}
                sched_steps = slowest_rank_steps([r["schedule_only"][ours_k] for r in per_rank])
                sched = median(sched_steps)
                bubble = median(per_rank[0]["bubbles"][ours_k])
                imbalance = median(per_rank[0]["imbalance"][ours_k])
                model = median(per_rank[0]["modelled"][ours_k])
                theory = (pp - 1) / (m + pp - 1)
                rec = {"pp": pp, "schedule": schedule, "m": m, "plait_step_s": step[ours_k],
                       "torch_step_s": step[peer_k],
                       "ratio": paired_ratio(steps[ours_k], steps[peer_k]),
                       "ratio_of_medians": step[ours_k] / step[peer_k],
                       "plait_schedule_only_s": sched,
                       "ratio_schedule_only": paired_ratio(sched_steps, steps[peer_k]),
                       "bubble_measured": bubble, "bubble_theory": theory,
                       "bubble_rel_err": (bubble - theory) / theory,
                       "bubble_model": model, "bubble_rel_err_model": (bubble - model) / model,
                       "stage_compute_max_over_min": imbalance,
                       "oversubscribed": pp > cpus}
                records.append(rec)
                rows.append([pp, schedule, m, f"{rec['plait_step_s'] * 1e3:.1f}",
                             f"{rec['torch_step_s'] * 1e3:.1f}", f"{rec['ratio']:.3f}",
                             f"{rec['ratio_schedule_only']:.3f}",
                             f"{bubble:.3f}", f"{theory:.3f}", f"{100 * rec['bubble_rel_err']:+.0f}%",
                             f"{model:.3f}", f"{100 * rec['bubble_rel_err_model']:+.0f}%",
                             f"{imbalance:.3f}" + (" *" if pp > cpus else "")])
    ratio = math.exp(sum(math.log(r["ratio"]) for r in records) / len(records))
    ratio_sched = math.exp(sum(math.log(r["ratio_schedule_only"]) for r in records) / len(records))
    of_medians = math.exp(sum(math.log(r["ratio_of_medians"]) for r in records) / len(records))
    from plait.models import GPT
    params = GPT(ModelConfig(**model_kw)).num_params()
    write_json(args.json, {
        "benchmark": "pp_vs_torch", "ratio": ratio, "ratio_is": "geometric mean over rows of the "
        "median over rounds of plait's step time / torch.distributed.pipelining's step time in the "
        "same round", "ratio_of_medians": of_medians,
        "ratio_schedule_only": ratio_sched, "ratio_schedule_only_is": "the same, counting only "
        "plait's schedule (without summing the tied embedding/head gradients and sharing the loss "
        "with every rank, which torch's stages do not do)",
        "rows": records, "model": model_kw, "params": params, "micro_batch": micro_batch,
        "rounds": rounds, "backend": "gloo", "partition": "flops", "quick": args.quick,
        "bubble": "measured = 1 - compute / step span per stage (span: first stage's start to the "
                  "last stage's end), mean over stages, median over steps; theory = (p-1)/(m+p-1)",
        "target": "ratio <= 1.0; |bubble_rel_err| <= 10%",
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    })
    print_table(f"pipeline step time, GPT {params / 1e6:.2f}M params, micro-batch {micro_batch} × "
                f"{model_kw['block_size']} tokens, gloo, 1 thread/rank (median of {rounds} steps; "
                f"geo-mean ratio {ratio:.3f})",
                ["pp", "schedule", "m", "plait ms", "torch ms", "ratio", "sched-only", "bubble",
                 "theory", "Δ", "model", "Δ", "max/min stage"], rows)
    if any(r["oversubscribed"] for r in records):
        print(f"* {cpus} CPU cores for more ranks: stages share cores, so their compute times and "
              "bubble are not those of one device per stage")


if __name__ == "__main__":
    main()
