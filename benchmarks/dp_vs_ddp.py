"""plait's bucketed gradient reducer vs torch DDP (and plait's naive per-parameter mode).

Same GPT, same batch, dp=2 on the CPU with Gloo. The variants take turns round by round,
in an order reversed every other round (plait, DDP, naive, then naive, DDP, plait, ...), so drift in
machine load and whatever one variant leaves warm for the next hit all of them alike; each
reports the median step time (forward, backward with gradient all-reduce, AdamW step).

    python benchmarks/dp_vs_ddp.py [--quick] [--json benchmarks/results/dp_vs_ddp.json]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (benchmark_parser, median, print_table, round_order, slowest_rank_steps,  # noqa: E402
                    write_json)
from plait.config import ModelConfig  # noqa: E402
from plait.testing import WorkerPool  # noqa: E402

VARIANTS = ("plait-bucketed", "torch-ddp", "plait-naive")


def _bench(model_kw: dict, batch: int, bucket_mb: float, rounds: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from plait.models import GPT
    from plait.parallel.data import GradientReducer

    cfg = ModelConfig(**model_kw)
    rank = dist.get_rank()
    models, opts = {}, {}
    for name in VARIANTS:
        torch.manual_seed(0)
        m = GPT(cfg)
        if name == "torch-ddp":
            m = DDP(m, bucket_cap_mb=bucket_mb)
        else:
            GradientReducer(m, None, bucket_mb=bucket_mb, mode=name.split("-")[1])
        models[name] = m
        opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    def step(name: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        _, loss = models[name](x, y)
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {n: [] for n in VARIANTS}
    for name in VARIANTS:
        for _ in range(warmup):
            step(name)
    for r in range(rounds):
        for name in round_order(list(VARIANTS), r):
            times[name] += [step(name) for _ in range(steps)]
    return times


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer rounds (under a minute)")
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    args = ap.parse_args()
    model_kw = dict(n_layer=6, n_head=8, n_embd=256, block_size=128, dropout=0.0)
    batch = 8
    rounds, steps, warmup = (4, 3, 2) if args.quick else (12, 5, 3)
    with WorkerPool(2, timeout_s=1800, threads=1) as pool:
        times = pool.run(_bench, model_kw, batch, args.bucket_mb, rounds, steps, warmup, timeout_s=1800)
    per_step = {n: slowest_rank_steps([t[n] for t in times]) for n in VARIANTS}
    med = {n: median(v) for n, v in per_step.items()}
    ratio = med["plait-bucketed"] / med["torch-ddp"]
    naive_ratio = med["plait-naive"] / med["torch-ddp"]
    from plait.models import GPT
    params = GPT(ModelConfig(**model_kw)).num_params()
    payload = {
        "benchmark": "dp_vs_ddp", "ratio": ratio, "naive_ratio": naive_ratio,
        "median_step_s": med, "steps_per_variant": len(per_step["torch-ddp"]),
        "world_size": 2, "backend": "gloo", "model": model_kw, "params": params,
        "batch_per_rank": batch, "bucket_mb": args.bucket_mb, "quick": args.quick,
        "target": "ratio <= 1.05",
    }
    write_json(args.json, payload)
    rows = [[n, f"{med[n] * 1e3:.1f}", f"{med[n] / med['torch-ddp']:.3f}"] for n in VARIANTS]
    print_table(f"dp=2 gloo, GPT {params / 1e6:.1f}M params, batch {batch}/rank, buckets {args.bucket_mb} MB "
                f"(median of {len(per_step['torch-ddp'])} steps)", ["variant", "step ms", "vs DDP"], rows)


if __name__ == "__main__":
    main()
