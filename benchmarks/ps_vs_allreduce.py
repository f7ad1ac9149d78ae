"""Parameter server (sync with 1 and 2 servers, async) vs plait's all-reduce data parallelism.

Same GPT, same per-worker batch, 2 workers on the CPU with Gloo. The all-reduce job is those 2
ranks (GradientReducer + AdamW on each); a parameter-server job adds 1 or 2 server processes that
hold the parameters and run AdamW on their shard. Sync step time is the slowest worker's
forward + backward + exchange (+ optimizer step for all-reduce); async reports samples/s over
the whole run, since its workers never line up. The variants take turns round by round, in an
order reversed every other round, so drift in machine load and whatever one variant leaves warm for
the next hit all of them alike; medians are reported.

    python benchmarks/ps_vs_allreduce.py [--quick] [--json benchmarks/results/ps_vs_allreduce.json]
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

WORKERS = 2
# name -> (servers, mode); servers 0 is the all-reduce job.
VARIANTS = {"all-reduce": (0, None), "ps-sync-1": (1, "sync"), "ps-sync-2": (2, "sync"),
            "ps-async-1": (1, "async"), "ps-async-2": (2, "async")}


def _batch(cfg: ModelConfig, batch: int, rank: int):
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _allreduce(model_kw: dict, batch: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist

    from plait.models import GPT
    from plait.parallel.data_parallel.reducer import GradientReducer

    cfg = ModelConfig(**model_kw)
    torch.manual_seed(0)
    model = GPT(cfg)
    reducer = GradientReducer(model, None, bucket_mb=4.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = _batch(cfg, batch, dist.get_rank())
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    reducer.remove()
    return {"step_s": times[warmup:]}


def _parameter_server(model_kw: dict, batch: int, steps: int, warmup: int, servers: int, mode: str) -> dict:
    import torch.distributed as dist

    from plait.models import GPT
    from plait.parallel.parameter_server import ParameterServer, PSLayout, PSOptions, PSWorker

    cfg = ModelConfig(**model_kw)
    torch.manual_seed(0)
    model = GPT(cfg)
    layout = PSLayout.build(servers)
    workers = dist.new_group(layout.workers)  # collective; the workers line up on it in sync mode
    opts = PSOptions(mode=mode, optimizer="adam", lr=1e-4, worker_timeout_s=600.0)
    if layout.is_server:
        stats = ParameterServer(model, layout, opts).serve()
        return {"bytes_received": stats.bytes_received, "updates": stats.updates}
    worker = PSWorker(model, layout, opts)
    worker.start()
    x, y = _batch(cfg, batch, layout.rank)
    times, wall0 = [], None
    for i in range(warmup + steps):
        if mode == "sync" or i == warmup:
            dist.barrier(group=workers)
        t0 = time.perf_counter()
        if i == warmup:
            wall0 = time.time()
        model(x, y)[1].backward()
        worker.push_pull()
        times.append(time.perf_counter() - t0)
    wall1 = time.time()
    worker.finish()
    return {"step_s": times[warmup:], "start": wall0, "end": wall1}


def _run(pools: dict, name: str, model_kw: dict, batch: int, steps: int, warmup: int) -> dict:
    servers, mode = VARIANTS[name]
    if servers == 0:
        res = pools[WORKERS].run(_allreduce, model_kw, batch, steps, warmup, timeout_s=1800)
    else:
        res = pools[WORKERS + servers].run(_parameter_server, model_kw, batch, steps, warmup, servers, mode,
                                           timeout_s=1800)
    workers = res[servers:]
    # A sync step ends for the job when its slowest worker ends; async counts samples over time.
    per_step = slowest_rank_steps([w["step_s"] for w in workers])
    out = {"step_s": per_step}
    if mode == "async":
        wall = max(w["end"] for w in workers) - min(w["start"] for w in workers)
        out["samples_per_s"] = len(workers) * steps * batch / wall
    if servers:
        out["server_bytes_per_step"] = sum(s["bytes_received"] for s in res[:servers]) / (
            res[0]["updates"] // (1 if mode == "sync" else WORKERS))
    return out


# Two workloads on the same 2 workers: compute-bound (a GPT step of ~0.1 s per worker) and
# communication-bound (a 4x larger GPT on one short sequence), where the server's links matter.
SETTINGS = {
    "compute-bound": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0), 8),
    "comm-bound": (dict(n_layer=4, n_head=4, n_embd=256, block_size=16, dropout=0.0), 1),
}


def _measure(pools: dict, model_kw: dict, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    step_s = {n: [] for n in VARIANTS}
    samples = {n: [] for n in VARIANTS}
    bytes_per_step = {}
    for r in range(rounds):
        for name in round_order(list(VARIANTS), r):  # A B C D E, E D C B A, ...
            out = _run(pools, name, model_kw, batch, steps, warmup)
            step_s[name] += out["step_s"]
            if "samples_per_s" in out:
                samples[name].append(out["samples_per_s"])
            if "server_bytes_per_step" in out:
                bytes_per_step[name] = out["server_bytes_per_step"]
    med = {n: median(v) for n, v in step_s.items()}
    throughput = {n: (median(samples[n]) if samples[n] else WORKERS * batch / med[n]) for n in VARIANTS}
    base = med["all-reduce"]
    from plait.models import GPT
    return {
        "ratio": med["ps-sync-1"] / base,
        "ratios": {n: med[n] / base for n in VARIANTS if VARIANTS[n][1] != "async"},
        "throughput_ratios": {n: throughput[n] / throughput["all-reduce"] for n in VARIANTS},
        "median_step_s": med, "samples_per_s": throughput, "server_bytes_per_step": bytes_per_step,
        "steps_per_variant": len(step_s["all-reduce"]), "model": model_kw,
        "params": GPT(ModelConfig(**model_kw)).num_params(), "batch_per_worker": batch,
    }


def main() -> None:
    ap = benchmark_parser(__doc__, "fewer rounds (under a minute)")
    args = ap.parse_args()
    rounds, steps, warmup = (2, 3, 1) if args.quick else (8, 8, 2)
    pools = {n: WorkerPool(n, timeout_s=1800, threads=1) for n in (WORKERS, WORKERS + 1, WORKERS + 2)}
    try:
        results = {name: _measure(pools, kw, batch, rounds, steps, warmup)
                   for name, (kw, batch) in SETTINGS.items()}
    finally:
        for p in pools.values():
            p.close()
    first = results["compute-bound"]
    payload = {
        "benchmark": "ps_vs_allreduce",
        # sync PS (1 server) step time / all-reduce step time on the compute-bound GPT
        "ratio": first["ratio"], "settings": results, "workers": WORKERS, "backend": "gloo",
        "quick": args.quick,
    }
    write_json(args.json, payload)
    for name, r in results.items():
        med, tput = r["median_step_s"], r["samples_per_s"]
        rows = [[n, servers, f"{med[n] * 1e3:.1f}", f"{tput[n]:.0f}",
                 f"{r['ratios'][n]:.2f}" if n in r["ratios"] else "-",
                 f"{r['throughput_ratios'][n]:.2f}",
                 f"{r['server_bytes_per_step'][n] / 1e6:.1f}" if n in r["server_bytes_per_step"] else "-"]
                for n, (servers, _) in VARIANTS.items()]
        print_table(f"{name}: {WORKERS} workers, gloo, GPT {r['params'] / 1e6:.2f}M params, batch "
                    f"{r['batch_per_worker']}x{r['model']['block_size']}/worker (median of "
                    f"{r['steps_per_variant']} steps; async step ms is per worker, unsynchronised)",
                    ["variant", "servers", "step ms", "samples/s", "step vs all-reduce",
                     "samples/s vs all-reduce", "server MB in/step"], rows)


if __name__ == "__main__":
    main()
