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

VERSION = 3


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


def _gloo_op(kind: str, t, rank: int):
    import torch
    import torch.distributed as dist

    if kind == "all_reduce":
        return lambda: dist.all_reduce(t)
    if kind == "reduce_scatter":
        out = torch.empty(t.numel() // 2)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: fn(out, t)
    if kind == "all_gather":
        half, out = t[: t.numel() // 2].clone(), torch.empty_like(t)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: fn(out, half)
    return lambda: dist.send(t, 1) if rank == 0 else dist.recv(t, 0)


def _gloo_worker(rank: int, path: str, sizes: list[int], threads: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        times: dict[str, list[float]] = {}
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
        Path(f"{out}.{rank}").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def _gloo_alpha_beta(threads: int) -> dict[str, tuple[float, float]]:
    """Per collective kind, α (per ring step) and β (bytes/s) of Gloo between two local processes."""
    import torch.multiprocessing as mp

    sizes = [1024, 1 << 20]  # fp32 elements: 4 KB and 4 MB
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        mp.start_processes(_gloo_worker, args=(os.path.join(tmp, "store"), sizes, threads, out),
                           nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    fitted = {}
    for kind, (ca, cb) in GLOO_KINDS.items():
        small, large = (max(r[kind][i] for r in ranks) for i in range(2))  # the slower rank's time
        beta = cb * 4.0 * (sizes[1] - sizes[0]) / max(large - small, 1e-9)
        fitted[kind] = (max((small - cb * 4.0 * sizes[0] / beta) / ca, 1e-7), beta)
    return fitted


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
        "op_overhead_s": per_op, "rates": rates, "gloo": gloo,
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
