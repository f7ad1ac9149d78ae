"""How long an op or a collective takes on a device or over a group of a cluster.

Ops on a GPU follow the roofline model (Williams, Waterman & Patterson 2009): the longer of
FLOPs / achievable FLOP/s and bytes / achievable bandwidth, plus a launch. Matmuls lose what
wave quantization costs (NVIDIA, "Matrix Multiplication Background User's Guide": output tiles
are spread over the SMs in waves, and a last, partial wave runs at a fraction of the GPU).
Ops on a CPU take their measured per-op rates. Collectives follow the α–β model of the ring
algorithms (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009): an all-reduce over n ranks
of B bytes takes 2(n−1)·α + 2(n−1)/n · B/β, a reduce-scatter or all-gather (n−1)·α + (n−1)/n ·
B/β, a point-to-point send α + B/β. On a CPU host, where α and β come from idle processes trading
buffers, each ring step also pays σ, its measured synchronisation cost when the collective is
issued between compute (`plait.plan.calibrate`).
"""

from __future__ import annotations

import functools
import math

from plait.plan.hardware import Cluster, Device
from plait.plan.ops import Comm, Op

_TILE = (256, 128)  # cuBLAS's large output tile on Ampere/Hopper, in either orientation


@functools.lru_cache(maxsize=65536)
def wave_efficiency(m: int, n: int, sms: int) -> float:
    """Share of the SMs' time a GEMM with an m×n output keeps busy (1.0 when it is not known)."""
    if sms <= 0 or m <= 0 or n <= 0:
        return 1.0
    best = 0.0
    for tm, tn in (_TILE, _TILE[::-1]):
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles / sms)
        best = max(best, tiles / (waves * sms))
    return best


def op_time(dev: Device, op: Op) -> float:
    """Seconds one op takes on `dev`."""
    if dev.kind == "cpu":
        return _cpu_time(dev, op) + dev.launch_s * op.count
    bw = dev.mem_bw * dev.mem_efficiency
    if op.kind == "gemm":
        eff = wave_efficiency(op.mnk[0], op.mnk[2], dev.sms)
        compute = op.flops / (dev.matmul_flops * eff)
    elif op.kind in ("attn_fwd", "attn_bwd"):
        share = dev.attention_efficiency[0 if op.kind == "attn_fwd" else 1]
        compute = op.flops / (dev.peak_flops * dev.sustained_clock * share)
    else:
        compute = 0.0
    return max(compute, op.bytes / bw) + dev.launch_s * op.count


def _cpu_time(dev: Device, op: Op) -> float:
    if op.kind == "gemm":
        return op.flops / dev.rate("gemm")
    if op.kind in ("attn_fwd", "attn_bwd"):
        return op.flops / dev.rate(op.kind)
    if op.kind == "memory":
        return op.bytes / dev.mem_bw
    return op.elements / dev.rate(op.kind)


def ops_time(dev: Device, ops: list[Op]) -> tuple[float, float]:
    """(matmul and attention time, time of all other ops)."""
    heavy = other = 0.0
    for op in ops:
        t = op_time(dev, op)
        if op.kind in ("gemm", "attn_fwd", "attn_bwd"):
            heavy += t
        else:
            other += t
    return heavy, other


def collective_time(kind: str, nbytes: float, size: int, alpha: float, beta: float) -> float:
    """Ring α–β time of one collective of `nbytes` (the whole tensor) over `size` ranks."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    if kind == "all_reduce":
        return 2 * (size - 1) * alpha + 2 * (size - 1) / size * nbytes / beta
    if kind in ("reduce_scatter", "all_gather"):
        return (size - 1) * alpha + (size - 1) / size * nbytes / beta
    if kind == "p2p":
        return alpha + nbytes / beta
    raise ValueError(f"unknown collective {kind!r}")


def group_params(cluster: Cluster, group: str, dp: int, pp: int, tp: int,
                 kind: str = "all_reduce") -> tuple[int, float, float]:
    """(size, α, β) of a mesh group for one kind of collective: rank = (pp_index·dp +
    dp_index)·tp + tp_index, so tp groups are neighbours, dp groups are tp apart and pp groups
    dp·tp apart. A cluster measured per kind (Gloo on one host) uses its own α and β."""
    # "tied": the first and last pipeline stage (weights tied across them, e.g. GPT's embedding/head).
    size, stride = {"tp": (tp, 1), "dp": (dp, tp), "pp": (pp, dp * tp), "tied": (2, max(1, (pp - 1) * dp * tp))}[group]
    for name, alpha, beta in cluster.collectives:
        if name == kind:
            return size, alpha, beta
    alpha, beta = cluster.group_beta(size, stride)
    return size, alpha, beta


def ring_steps(kind: str, size: int) -> int:
    """Blocking exchanges with a peer in one ring collective over `size` ranks."""
    if size <= 1:
        return 0
    return {"all_reduce": 2 * (size - 1), "reduce_scatter": size - 1, "all_gather": size - 1}.get(kind, 1)


def collective(cluster: Cluster, kind: str, nbytes: float, group: str, dp: int, pp: int, tp: int) -> float:
    """Time of one collective of `nbytes` over a mesh group of the cluster, issued between compute:
    its α–β time plus, per ring step, the cluster's measured synchronisation cost, if any."""
    size, alpha, beta = group_params(cluster, group, dp, pp, tp, kind)
    size = 2 if kind == "p2p" else size
    t = collective_time(kind, nbytes, size, alpha, beta)
    if t > 0:
        t += ring_steps(kind, size) * cluster.sync
    return t


def comms_time(cluster: Cluster, comms: list[Comm], dp: int, pp: int, tp: int) -> float:
    return sum(collective(cluster, c.kind, c.bytes, c.group, dp, pp, tp) for c in comms)
