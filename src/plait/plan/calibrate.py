"""Measure "this CPU" for the hardware table: a few seconds of microbenchmarks, cached.

A CPU has no datasheet peak that predicts PyTorch's speed on it: its matmuls, its fused attention
and its elementwise kernels (GELU and softmax are compute-bound here, not bandwidth-bound) run
at rates of their own, and a process's every op pays a dispatch. So each primitive the cost model
uses is timed once, in this process, with the thread count the runs will use: matmuls forward and
backward, causal SDPA forward and backward, GELU, LayerNorm and cross-entropy forward and
backward, an out-of-place add (memory bandwidth), the dispatch of a tiny op, AdamW per parameter
and per tensor, and Gloo's all-reduce, reduce-scatter, all-gather and send between two local
processes (α and β of each). The result is cached per CPU model, core count, thread count and
torch version.

A step issues its collectives between compute, and there they cost more than idle processes
trading buffers show: a rank that waits for its peer sleeps, and waking it again (the scheduler,
and on a virtual machine the hypervisor running the halted vCPU) takes up to milliseconds that a
fastest-of-repeats timing never sees. So each kind is also timed after bursts of compute on every
rank (each run's mean over its calls, the median run): the synchronisation cost σ per ring step
beyond α–β, with one process per core and with two processes per core (forked from the first two
and pinned to two cores), where a peer may also wait for a core; with two per core, compute's own
slowdown from the processes' switching is measured as well. The whole calibration takes about
6 s on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 4


def cache_path() -> Path:
    root = os.environ.get("PLAIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "plait")
    return Path(root) / "cpu-calibration.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(threads: int) -> str:
    import torch

    return f"v{VERSION}|{_cpu_name()}|{len(os.sched_getaffinity(0))} cores|{threads} threads|torch {torch.__version__}"


def _best_time(fn: Callable[[], Any], repeats: int = 15, warmup: int = 2) -> float:
    """The fastest of `repeats` runs: what the CPU does when nothing else holds its cores (the
    median would measure whoever else was running). Each run is kept to a millisecond or two, so
    that some run fits in one scheduler slice even on a shared machine."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def _fwd_bwd(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(forward seconds, backward seconds) of `fn()`'s output summed."""
    t_fwd = _best_time(fn, repeats)

    def both():
        fn().float().sum().backward()

    return t_fwd, max(_best_time(both, repeats) - t_fwd, 1e-9)


def _compute_rates(repeats: int = 15) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    rates: dict[str, float] = {}
    # Matmuls as linear layers do them: forward, then input and weight gradients.
    gemm = []
    for n, k, out in ((512, 128, 384), (256, 256, 1024), (512, 512, 128)):
        x = torch.randn(n, k, generator=g, requires_grad=True)
        w = torch.randn(out, k, generator=g, requires_grad=True)
        f, b = _fwd_bwd(lambda x=x, w=w: F.linear(x, w), repeats)
        gemm.append(6.0 * n * k * out / (f + b))
    rates["gemm"] = statistics.median(gemm)
    # Causal SDPA, counted as the cost model counts it (executed FLOPs: half of 4·b·s²·h forward,
    # 2.5× that backward).
    b, heads, s, dh = 8, 4, 128, 32
    q, k_, v = (torch.randn(b, heads, s, dh, generator=g, requires_grad=True) for _ in range(3))
    f, bw = _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k_, v, is_causal=True), repeats)
    executed = 0.5 * 4.0 * b * s * s * heads * dh
    rates["attn_fwd"], rates["attn_bwd"] = executed / f, 2.5 * executed / bw
    # Elementwise kernels, per element.
    x = torch.randn(512, 512, generator=g, requires_grad=True)
    f, bw = _fwd_bwd(lambda: F.gelu(x, approximate="tanh"), repeats)
    rates["gelu"], rates["gelu_bwd"] = x.numel() / f, x.numel() / bw
    x = torch.randn(1024, 128, generator=g, requires_grad=True)
    ln = torch.nn.LayerNorm(128)
    f, bw = _fwd_bwd(lambda: ln(x), repeats)
    rates["norm"], rates["norm_bwd"] = x.numel() / f, x.numel() / bw
    logits = torch.randn(1024, 256, generator=g, requires_grad=True)
    target = torch.randint(0, 256, (1024,), generator=g)
    f, bw = _fwd_bwd(lambda: F.cross_entropy(logits, target), repeats)
    rates["xent"], rates["xent_bwd"] = logits.numel() / f, logits.numel() / bw
    # AdamW as plait runs it on a CPU (torch's default implementation): per parameter and per tensor.
    big = [torch.nn.Parameter(torch.randn(1 << 18, generator=g))]
    small = [torch.nn.Parameter(torch.randn(16, generator=g)) for _ in range(64)]
    for group in (big, small):
        for p in group:
            p.grad = torch.randn_like(p)
    t_big = _best_time(torch.optim.AdamW(big, lr=1e-4).step, repeats)
    t_small = _best_time(torch.optim.AdamW(small, lr=1e-4).step, repeats)
    per_tensor = max(t_small / len(small), 1e-9)
    rates["adamw_tensor"] = 1.0 / per_tensor
    rates["adamw_param"] = (1 << 18) / max(t_big - per_tensor, 1e-9)
    return rates


def _memory_and_dispatch(repeats: int = 15) -> tuple[float, float]:
    import torch

    x, y = torch.randn(1 << 19), torch.randn(1 << 19)
    bw = 12.0 * x.numel() / _best_time(lambda: torch.add(x, y), repeats)
    # Dispatch of one op as a model runs it: a module call forward, an autograd node backward.
    # A chain of tiny LayerNorms does (almost) nothing else: one forward and one backward op each.
    norm, x = torch.nn.LayerNorm(8), torch.randn(2, 8, requires_grad=True)

    def chain():
        y = x
        for _ in range(50):
            y = norm(y)
        y.sum().backward()

    per_op = _best_time(chain, repeats) / 100
    return bw, per_op


# Gloo's collectives as plait calls them, timed between two local processes. Per kind, the time of
# B bytes over the two ranks is c_α·α + c_β·B/β (the ring formulas at n = 2; B the full tensor).
GLOO_KINDS = {"all_reduce": (2, 1.0), "reduce_scatter": (1, 0.5), "all_gather": (1, 0.5), "p2p": (1, 1.0)}
SYNC_RUNS, SYNC_CALLS = 5, 12  # collectives timed between compute: runs of calls per kind


def _gloo_op(kind: str, t, rank: int, world: int = 2):
    """One collective of `kind` on `t` over all ranks; p2p: even ranks send to the next one."""
    import torch
    import torch.distributed as dist

    if kind == "all_reduce":
        return lambda: dist.all_reduce(t)
    if kind == "reduce_scatter":
        out = torch.empty(t.numel() // world)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: fn(out, t)
    if kind == "all_gather":
        part, out = t[: t.numel() // world].clone(), torch.empty_like(t)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: fn(out, part)
    return lambda: dist.send(t, rank + 1) if rank % 2 == 0 else dist.recv(t, rank - 1)


def _compute_burst(generator) -> Callable[[], None]:
    """About half a millisecond of matmuls: the work a rank does between two of a step's collectives."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(256, 128, generator=generator), torch.randn(256, 128, generator=generator)

    def burst():
        for _ in range(3):
            F.linear(x, w)

    return burst


def _timed_under_compute(ops: dict, burst: Callable[[], Any], barrier: Callable[[], Any]) -> dict[str, list[float]]:
    """Per op: each run's mean seconds from the end of a compute burst to the op's return."""
    runs: dict[str, list[float]] = {}
    for kind, op in ops.items():
        op()
        runs[kind] = []
        for _ in range(SYNC_RUNS):
            barrier()
            waited = 0.0
            for _ in range(SYNC_CALLS):
                burst()
                t0 = time.perf_counter()
                op()
                waited += time.perf_counter() - t0
            runs[kind].append(waited / SYNC_CALLS)
    return runs


def _per_burst(burst: Callable[[], Any], barrier: Callable[[], Any]) -> list[float]:
    """Per run of compute bursts started together on every rank: wall seconds per burst. Runs
    span several scheduler slices, so that processes sharing a core take turns within each."""
    runs, calls = [], 4 * SYNC_CALLS
    for _ in range(SYNC_RUNS):
        barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            burst()
        runs.append((time.perf_counter() - t0) / calls)
    return runs


def _median_run(per_rank: list[list[float]]) -> float:
    """Of runs timed on every rank at once, the median run's mean over the ranks."""
    return statistics.median(statistics.mean(run) for run in zip(*per_rank))


def _oversubscribed_worker(rank: int, path: str, n: int, threads: int, cores: list[int], out: str) -> None:
    """One of 2·len(cores) ranks pinned to `cores`: runs of compute bursts, then runs of bursts each
    followed by a collective of each kind over all ranks (p2p: in pairs), timed whole."""
    import datetime

    import torch
    import torch.distributed as dist

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    world = 2 * len(cores)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        burst = _compute_burst(torch.Generator().manual_seed(rank))
        t = torch.zeros(n)
        ops = {kind: _gloo_op(kind, t, rank, world) for kind in GLOO_KINDS}
        times: dict[str, Any] = {"burst": _per_burst(burst, dist.barrier)}
        for kind, op in ops.items():
            runs = []
            for _ in range(SYNC_RUNS):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(SYNC_CALLS):
                    burst()
                    op()
                runs.append((time.perf_counter() - t0) / SYNC_CALLS)
            times[kind] = runs
        Path(f"{out}.{rank}").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def _gloo_worker(rank: int, path: str, sizes: list[int], threads: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        times: dict[str, Any] = {}
        for kind in GLOO_KINDS:
            times[kind] = []
            for n in sizes:
                op = _gloo_op(kind, torch.zeros(n), rank)
                for _ in range(3):
                    op()
                samples = []
                for _ in range(10):
                    dist.barrier()
                    t0 = time.perf_counter()
                    op()
                    samples.append(time.perf_counter() - t0)
                times[kind].append(min(samples))
        # The same collectives as a training step issues them: each after a burst of compute on
        # both ranks, timed from the end of this rank's compute to the collective's return. What a
        # rank waits here beyond the idle α–β time (its peer waking from its wait, the scheduler
        # and, on a virtual machine, the hypervisor running the woken vCPU again) is paid by every
        # collective in a step, yet the fastest of barrier-aligned repeats never sees it. So each
        # run's mean is kept (the stalls are the point), and the median of the runs.
        burst = _compute_burst(torch.Generator().manual_seed(rank))
        ops = {kind: _gloo_op(kind, torch.zeros(sizes[0]), rank) for kind in GLOO_KINDS}
        times["compute"] = _timed_under_compute(ops, burst, dist.barrier)
        times["burst"] = _per_burst(burst, dist.barrier)
        Path(f"{out}.{rank}").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()
    # Twice as many processes as cores: each rank forks a second one (torch is imported already,
    # a spawn would import it again), and all are pinned to at most two cores.
    cores = sorted(os.sched_getaffinity(0))[:2]
    if rank >= len(cores):
        return
    child = os.fork()
    if child == 0:
        code = 1
        try:
            _oversubscribed_worker(rank + len(cores), f"{path}.over", sizes[0], threads, cores, f"{out}.over")
            code = 0
        finally:
            os._exit(code)
    try:
        _oversubscribed_worker(rank, f"{path}.over", sizes[0], threads, cores, f"{out}.over")
    finally:
        _, status = os.waitpid(child, 0)
    if status:
        raise RuntimeError(f"oversubscribed calibration rank {rank + len(cores)} failed (status {status})")


def _gloo_alpha_beta(threads: int) -> dict[str, Any]:
    """Gloo between local processes: per collective kind, α (per ring step) and β (bytes/s) of two
    idle processes ("gloo"); σ, the seconds each ring step pays on top when the collective is
    issued between compute as in a training step, with one process per core ("gloo_sync") and with
    two ("gloo_sync_oversubscribed"); and how much slower compute runs two to a core than the
    one-per-core share of it ("oversubscribed_compute").

    σ is one figure for all kinds: what it measures (a blocked rank waking when its peer's data
    arrives) does not depend on the collective, and pooling the kinds' calls steadies a mean
    over waits that are either nothing or milliseconds."""
    import torch.multiprocessing as mp

    from plait.plan.timing import collective_time, ring_steps

    sizes = [1024, 1 << 20]  # fp32 elements: 4 KB and 4 MB
    cores = min(2, len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        mp.start_processes(_gloo_worker, args=(os.path.join(tmp, "store"), sizes, threads, out),
                           nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
        over = [json.loads(Path(f"{out}.over.{r}").read_text()) for r in range(2 * cores)]
    fitted = {}
    small_bytes = 4.0 * sizes[0]
    for kind, (ca, cb) in GLOO_KINDS.items():
        small, large = (max(r[kind][i] for r in ranks) for i in range(2))  # the slower rank's time
        beta = cb * 4.0 * (sizes[1] - sizes[0]) / max(large - small, 1e-9)
        fitted[kind] = (max((small - cb * small_bytes / beta) / ca, 1e-7), beta)

    def sync(per_rank: list[dict], size: int, burst: float) -> float:
        """Seconds per ring step: each run's time beyond the α–β time (and the compute burst, where
        it is included), summed over the kinds and divided by their ring steps; the median run."""
        steps = sum(ring_steps(kind, 2 if kind == "p2p" else size) for kind in GLOO_KINDS)
        runs = zip(*([statistics.mean(calls) for calls in zip(*(r[kind] for r in per_rank))]
                     for kind in GLOO_KINDS))
        excess = [sum(t - burst - collective_time(kind, small_bytes, 2 if kind == "p2p" else size, *fitted[kind])
                      for kind, t in zip(GLOO_KINDS, run)) / steps for run in runs]
        return max(statistics.median(excess), 0.0)

    over_burst = _median_run([r["burst"] for r in over])
    return {"gloo": fitted, "gloo_sync": sync([r["compute"] for r in ranks], 2, 0.0),
            "gloo_sync_oversubscribed": sync(over, 2 * cores, over_burst),
            "oversubscribed_compute": max(over_burst / (2 * _median_run([r["burst"] for r in ranks])), 1.0)}


def calibrate_cpu(threads: int = 1, refresh: bool = False) -> dict[str, Any]:
    """This CPU's rates for `threads` threads per process (cached; `refresh` measures again)."""
    import torch

    key = _key(threads)
    path = cache_path()
    cache: dict[str, Any] = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if not refresh and key in cache:
        return cache[key]
    log.info("calibrating this CPU (%d thread(s) per process); cached in %s", threads, path)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        rates = _compute_rates()
        mem_bw, per_op = _memory_and_dispatch()
        gloo = _gloo_alpha_beta(threads)
    finally:
        torch.set_num_threads(before)
    record = {
        "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "threads": threads,
        "torch": torch.__version__, "matmul_flops": rates["gemm"], "mem_bw": mem_bw,
        "mem_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "op_overhead_s": per_op, "rates": rates, **gloo,
        "load_average": os.getloadavg()[0], "seconds": time.perf_counter() - t0, "measured_at": time.time(),
    }
    record = json.loads(json.dumps(record))  # the same values a cached read returns
    if record["load_average"] > record["cores"]:
        log.warning("calibrated while the CPU was busy (load average %.1f on %d cores): rates are the "
                    "fastest of several repeats, but may still be low", record["load_average"], record["cores"])
    cache[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError as exc:  # a read-only home still plans, just without the cache
        log.warning("could not cache the CPU calibration at %s: %s", path, exc)
    return record
