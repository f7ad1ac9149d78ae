"""What live straggler statistics cost: the same training steps with them on and off.

dp=2 on Gloo, 2 CPU processes, plait's Trainer on a small GPT. "on": what `plait train` does with
`profile.straggler_interval = 10`: every collective timed through plait's communication tap, and
one small all-gather of per-rank statistics every 10 steps; "off": neither
(`straggler_interval = 0`).

Two runs of the same config differ by more on this machine (±10%) than what is measured here, so
the variants alternate within each run, in blocks of 10 steps (on, off, off, on, on, off, ...),
each block paying for its own all-gather. A block's time is its mean step time (so the statistics'
all-gather counts); `"ratio"` = the median over neighbouring (on, off) block pairs of their ratio
(the target is ≤ 1.02). The first steps of each run are its warm-up.

    python benchmarks/profile_overhead.py [--quick] [--json benchmarks/results/profile_overhead.json]
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, median, print_table, write_json  # noqa: E402
from plait.testing import WorkerPool  # noqa: E402

INTERVAL = 10
WORDS = ("the model data rank gradient bucket tensor process step loss mesh layer token sample "
         "batch epoch reduce gather scatter parameter optimizer").split()


def _blocks(cfg_dict: dict, pairs: int, warmup: int) -> list[tuple[float, float]]:
    """On this rank: (on, off) mean step seconds of each neighbouring pair of blocks."""
    import torch.distributed as dist

    from plait.config import Config
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer

    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build(dp=cfg.parallel.dp)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    perf = trainer.perf
    for _ in range(warmup):
        trainer.train_step()

    def block(on: bool) -> float:
        """INTERVAL steps, as Trainer.fit runs them, with the statistics on or off."""
        dist.barrier()
        t0 = time.perf_counter()
        with perf.running() if on else contextlib.nullcontext():
            for _ in range(INTERVAL):
                step = trainer.step + 1
                with perf.step(step):
                    trainer.train_step()
                if on:
                    perf.after_step(step)  # the all-gather, once per block
        return (time.perf_counter() - t0) / INTERVAL

    out = []
    for i in range(pairs):  # on off, off on, on off, ...
        first = block(i % 2 == 0)
        second = block(i % 2 == 1)
        out.append((first, second) if i % 2 == 0 else (second, first))
    return out


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer blocks (under a minute)")
    args = ap.parse_args()
    pairs, warmup = (6, 3) if args.quick else (30, 3)
    model = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rng = random.Random(0)
        corpus = tmp / "corpus.txt"
        corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(40000)) + "\n")
        cfg = {"model": model, "data": {"path": str(corpus), "val_fraction": 0.05},
               "train": dict(steps=10 ** 6, micro_batch_size=8, warmup_steps=2, eval_interval=0,
                             log_interval=10 ** 6, out_dir=str(tmp / "run")),
               "checkpoint": {"resume": "none"}, "parallel": {"dp": 2, "bucket_mb": 1.0},
               "profile": {"straggler_interval": INTERVAL}}
        with WorkerPool(2, timeout_s=1800, threads=1) as pool:
            per_rank = pool.run(_blocks, cfg, pairs, warmup, timeout_s=1800)
    # A block ends when its slowest rank does.
    pairs_s = [(max(r[i][0] for r in per_rank), max(r[i][1] for r in per_rank)) for i in range(pairs)]
    ratios = [on / off for on, off in pairs_s]
    med = {"on": median([p[0] for p in pairs_s]), "off": median([p[1] for p in pairs_s])}
    load = os.getloadavg()
    payload = {
        "benchmark": "profile_overhead", "ratio": median(ratios), "pair_ratios": ratios,
        "ratio_of_medians": med["on"] / med["off"], "median_step_s": med, "pairs": pairs,
        "steps_per_block": INTERVAL, "world_size": 2, "backend": "gloo", "model": model,
        "batch_per_rank": 8, "straggler_interval": INTERVAL, "quick": args.quick,
        "load_average_1_5_15": [round(x, 2) for x in load], "target": "ratio <= 1.02",
    }
    write_json(args.json, payload)
    rows = [[v, f"{med[v] * 1e3:.2f}", f"{med[v] / med['off']:.3f}"] for v in ("on", "off")]
    rows.append(["ratio (median of pairs)", "", f"{median(ratios):.3f}"])
    print_table(f"live straggler statistics, dp=2 gloo, {pairs} pairs of {INTERVAL}-step blocks "
                f"(load {load[0]:.2f})", ["statistics", "step ms", "vs off"], rows)


if __name__ == "__main__":
    main()
