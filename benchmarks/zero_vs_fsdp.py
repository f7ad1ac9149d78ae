"""plait ZeRO-3 vs torch FSDP2 (`fully_shard`), dp=2 on Gloo: step time and peak memory.

The same GPT from the same weights, sharded two ways over 2 CPU processes: plait's
`parallelize(..., ParallelConfig(zero=3))` with its sharded AdamW, and FSDP2 with `fully_shard`
on every block and then on the root, with torch's AdamW over the DTensor parameters (same
decay / no-decay groups). Each step is forward, backward, gradient clipping and an AdamW step;
each rank trains on its own batch. The two sides take turns step by step (A B, B A, A B, ...) and
the medians of the per-step times (the slower rank's) are reported; the step-time ratio is the
median of side-by-side step ratios (`paired_ratio`), which a shared machine's drifting load does
not move. Losses of the warm-up steps are compared, so both sides provably do the same work.

Peak memory is measured per process in a separate run of each side, alone in the process: the
bytes of live tensors before the measured steps (a gc scan of tensor storages: sharded
parameters, optimizer state) plus the peak of the allocator events recorded by torch.profiler
(`profile_memory=True`) over 3 steps. Both sides are measured the same way; Gloo's internal
buffers are not seen by either.

    python benchmarks/zero_vs_fsdp.py [--quick] [--json benchmarks/results/zero_vs_fsdp.json]
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (benchmark_parser, median, paired_ratio, print_table, round_order,  # noqa: E402
                    slowest_rank_steps, write_json)
from plait.config import ModelConfig  # noqa: E402
from plait.testing import WorkerPool  # noqa: E402

SIDES = ("plait-zero3", "torch-fsdp2")
DP = 2


def _build(side: str, model_kw: dict):
    """(model, optimizer, step function) for one side, from the seed-0 GPT."""
    import torch.distributed as dist

    from plait.config import ParallelConfig, TrainConfig
    from plait.mesh import ParallelMesh
    from plait.models import GPT
    from plait.parallel import parallelize
    from plait.optim import optimizer_groups

    cfg = TrainConfig(lr=1e-4, grad_clip=1.0)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kw))
    if side == "plait-zero3":
        wrapped = parallelize(model, ParallelMesh.build(), ParallelConfig(zero=3))
        opt = wrapped.build_optimizer(cfg)

        def clip() -> None:
            wrapped.clip_grad_norm_(cfg.grad_clip)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        opt = torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

        def clip() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        _, loss = wrapped(x, y)
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return wrapped, opt, step


def _batch(model_kw: dict, batch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.distributed as dist
    g = torch.Generator().manual_seed(1000 * i + dist.get_rank())
    data = torch.randint(0, 256, (batch, model_kw["block_size"] + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _time(model_kw: dict, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist

    built = {s: _build(s, model_kw) for s in SIDES}
    losses = {s: [built[s][2](*_batch(model_kw, batch, i)) for i in range(warmup)] for s in SIDES}
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for r in range(rounds):
        for s in round_order(SIDES, r):
            for k in range(steps):
                x, y = _batch(model_kw, batch, warmup + r * steps + k)
                dist.barrier()
                t0 = time.perf_counter()
                built[s][2](x, y)
                times[s].append(time.perf_counter() - t0)
    return {"times": times, "losses": losses}


def _memory(side: str, model_kw: dict, batch: int) -> dict:
    from plait.testing.memory import live_tensor_bytes, track_allocations

    gc.collect()
    before = live_tensor_bytes()
    model, opt, step = _build(side, model_kw)
    for i in range(2):  # optimizer state exists from here on
        step(*_batch(model_kw, batch, i))
    gc.collect()
    base = live_tensor_bytes() - before
    with track_allocations() as trace:
        for i in range(3):
            step(*_batch(model_kw, batch, 2 + i))
    del model, opt, step
    gc.collect()
    return {"steady_bytes": base, "step_peak_bytes": trace.peak, "peak_bytes": base + trace.peak}


def main() -> None:
    ap = benchmark_parser(__doc__, "a smaller model and fewer rounds (under a minute)")
    args = ap.parse_args()
    if args.quick:
        model_kw = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
        batch, rounds, steps, warmup = 8, 12, 1, 2
    else:
        model_kw = dict(n_layer=6, n_head=8, n_embd=256, block_size=128, dropout=0.0)
        batch, rounds, steps, warmup = 8, 40, 1, 3  # one step per turn: pairs meet the same load
    with WorkerPool(DP, timeout_s=1800, threads=1) as pool:
        timed = pool.run(_time, model_kw, batch, rounds, steps, warmup, timeout_s=1800)
        mem = {s: pool.run(_memory, s, model_kw, batch, timeout_s=1800) for s in SIDES}
    per_step = {s: slowest_rank_steps([r["times"][s] for r in timed]) for s in SIDES}
    med = {s: median(v) for s, v in per_step.items()}
    peak = {s: max(r["peak_bytes"] for r in mem[s]) for s in SIDES}
    losses = timed[0]["losses"]
    gap = max(abs(a - b) for a, b in zip(*losses.values()))
    from plait.models import GPT
    params = GPT(ModelConfig(**model_kw)).num_params()
    payload = {
        "benchmark": "zero_vs_fsdp", "ratio": paired_ratio(per_step[SIDES[0]], per_step[SIDES[1]]),
        "ratio_is": "median over rounds of plait's step time / FSDP2's step time in the same round",
        "ratio_of_medians": med[SIDES[0]] / med[SIDES[1]],
        "memory_ratio": peak[SIDES[0]] / peak[SIDES[1]],
        "median_step_s": med, "step_s": per_step, "peak_bytes": peak,
        "memory_per_rank": mem, "warmup_losses": losses, "max_warmup_loss_gap": gap,
        "memory_method": "gc scan of live tensor storages after 2 steps + peak of torch.profiler "
                         "allocator events over the next 3 steps, each side alone in its process",
        "dp": DP, "backend": "gloo", "threads_per_rank": 1, "model": model_kw, "params": params,
        "batch": batch, "quick": args.quick, "target": "ratio <= 1.05, memory_ratio <= 1.0",
    }
    write_json(args.json, payload)
    base = SIDES[1]
    rows = [[s, f"{med[s] * 1e3:.1f}", f"{paired_ratio(per_step[s], per_step[base]):.3f}",
             f"{peak[s] / 2**20:.2f}", f"{peak[s] / peak[base]:.3f}"] for s in SIDES]
    print_table(f"dp={DP} gloo, GPT {params / 1e6:.2f}M params, batch {batch} x {model_kw['block_size']} "
                f"per rank (median of {len(per_step[base])} steps; warm-up losses agree within {gap:.1e})",
                ["side", "step ms", "vs FSDP2 (paired)", "peak MiB", "vs FSDP2"], rows)


if __name__ == "__main__":
    main()
