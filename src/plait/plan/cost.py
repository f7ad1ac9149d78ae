"""The cost model: step time, throughput and memory of one layout of a GPT on a cluster.

A step is m micro-batches of b sequences through each of the dp replicas. Each pipeline stage's
time per micro-batch is its ops' time plus its tensor-parallel collectives (`plait.plan.ops`,
`plait.plan.timing`), which Megatron-LM and plait do not overlap with compute. The pipeline
schedule turns stage times into the step's forward-backward time: with stage times t_i and m
micro-batches, GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush, Narayanan et al. 2021) take
Σ t_i + (m − 1)·max t_i, i.e. (m + p − 1)·t for equal stages, a bubble of (p − 1)/m of the ideal;
the interleaved schedule with v chunks per rank takes (m + (p − 1)/v)·max t_i (Narayanan et al.
2021 §2.2.2) and v times the sends; the naive split runs one micro-batch at a time. Then come the
data-parallel gradient reduction (overlapped with the last backward where the software and
device do it), the sum of weights tied across stages, gradient clipping and the optimizer step.

CPU processes that outnumber the cores share them: the step takes at least the work of all
processes divided by the cores (Graham 1969's bound for list scheduling on identical machines),
that work slowed by the measured cost of switching processes, plus the collectives' measured
synchronisation waits, which hold no core (`plait.plan.calibrate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from plait.errors import PlanError
from plait.plan.cut import pipeline_cut, stage_layers
from plait.plan.hardware import Cluster
from plait.plan.memory import Memory, device_memory, stage_params
from plait.plan.ops import (
    Comm,
    Dims,
    block_backward,
    block_forward,
    block_recompute,
    embedding_backward,
    embedding_forward,
    head_backward,
    head_forward,
)
from plait.plan.shapes import ModelShape
from plait.plan.software import PLAIT, Software
from plait.plan.timing import collective, comms_time, ops_time

USABLE_MEMORY = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation
BUCKET_BYTES = 25e6  # plait's default gradient bucket (parallel.bucket_mb)


@dataclass(frozen=True)
class Candidate:
    """One layout: mesh sizes and the knobs the search turns."""

    dp: int
    pp: int = 1
    tp: int = 1
    zero: int = 0
    micro_batch: int = 1          # sequences per micro-batch (train.micro_batch_size)
    schedule: str = "1f1b"        # pipelines only
    virtual_stages: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    partition: str = "flops"      # pipeline cut (parallel.partition; "time" is costed as "flops")

    def label(self) -> str:
        return f"dp{self.dp}·pp{self.pp}·tp{self.tp}"


@dataclass
class Estimate:
    """Predicted step of one candidate; times in seconds, memory in bytes per device."""

    candidate: Candidate
    microbatches: int             # per step and replica (pipeline micro-batches or accumulation)
    step_s: float
    breakdown: dict[str, float]
    memory: Memory
    fits: bool
    tokens_per_s: float
    model_flops_per_device: float
    hardware_flops_per_device: float
    mfu: float

    @property
    def bound(self) -> str:
        return max(self.breakdown, key=self.breakdown.get)

    def as_dict(self) -> dict:
        c = self.candidate
        return {"dp": c.dp, "pp": c.pp, "tp": c.tp, "zero": c.zero, "microbatches": self.microbatches,
                "micro_batch_size": c.micro_batch, "schedule": c.schedule if c.pp > 1 else None,
                "virtual_stages": c.virtual_stages, "recompute": c.recompute,
                "sequence_parallel": c.sequence_parallel, "step_s": self.step_s,
                "tokens_per_s": self.tokens_per_s, "tflops_per_gpu": self.hardware_flops_per_device / 1e12,
                "model_tflops_per_gpu": self.model_flops_per_device / 1e12, "mfu": self.mfu,
                "mem_gb": self.memory.total / 1e9, "fits": self.fits, "bound": self.bound,
                "breakdown_s": dict(self.breakdown)}


def _residual_bytes(sw: Software, cluster: Cluster) -> int:
    """Bytes per residual-stream element: fp32 where autocast keeps it so, else the activations'."""
    dev = cluster.device
    return 4 if (sw.residual_fp32 and dev.kind == "gpu") else dev.act_bytes


@functools.lru_cache(maxsize=4096)
def _layer_times(shape: ModelShape, cluster: Cluster, sw: Software, b: int, tp: int, dp: int, pp: int,
                 sp: bool, recompute: str) -> dict[str, tuple[float, float, float]]:
    """Per micro-batch: (matmul time, other ops, tp collectives) of a block (forward + backward +
    recomputation), the embedding and the head."""
    dev = cluster.device
    d = Dims(shape, b, tp, sp, dev.act_bytes, _residual_bytes(sw, cluster))
    vocab = tp > 1

    def timed(*works) -> tuple[float, float, float]:
        ops = [op for w in works for op in w[0]]
        comms: list[Comm] = [c for w in works for c in w[1]]
        heavy, other = ops_time(dev, ops)
        return heavy, other, comms_time(cluster, comms, dp, pp, tp)

    return {
        "block": timed(block_forward(d, sw), block_recompute(d, sw, recompute), block_backward(d, sw)),
        "embedding": timed(embedding_forward(d, sw, vocab), embedding_backward(d, vocab)),
        "head": timed(head_forward(d, sw, vocab), head_backward(d, sw, vocab)),
    }


def _pipeline(cluster: Cluster, c: Candidate, shape: ModelShape, sw: Software, stage_t: list[float],
              m: int) -> tuple[float, float]:
    """(forward-backward time of the step, point-to-point sends on its critical path)."""
    p, v = c.pp, (c.virtual_stages if c.schedule == "interleaved" else 1)
    t_max = max(stage_t)
    if p == 1:
        return m * t_max, 0.0
    if c.schedule == "naive":
        t_fb, sends = m * sum(stage_t), 2 * m * (p - 1)
    elif c.schedule == "interleaved":
        t_fb, sends = (m + (p - 1) / v) * t_max, 2 * (m * v + p - 1)
    else:
        t_fb, sends = sum(stage_t) + (m - 1) * t_max, 2 * (m + p - 1)
    act = c.micro_batch * shape.seq * shape.n_embd * _residual_bytes(sw, cluster)
    split = c.tp if (c.sequence_parallel or sw.pipeline_scatter_gather) else 1
    one = collective(cluster, "p2p", act / split, "pp", c.dp, c.pp, c.tp)
    if sw.pipeline_scatter_gather and not c.sequence_parallel and c.tp > 1:
        one += collective(cluster, "all_gather", act, "tp", c.dp, c.pp, c.tp)  # rebuilt in the node
    return t_fb, sends * one


def _data_parallel_comm(cluster: Cluster, c: Candidate, psi: float, blocks: int, m: int,
                        sw: Software) -> tuple[float, float]:
    """(all data-parallel communication of a step, its part that can never be hidden).

    Volumes follow ZeRO (Rajbhandari et al. 2020 §7): stages 0-1 all-reduce the gradients
    (2Ψ), stage 1 then all-gathers the updated weights, stage 2 reduce-scatters the gradients of
    every micro-batch, stage 3 also gathers each block's weights for forward and again for
    backward (3Ψ per micro-batch). Each collective pays its latency: the reducer sends buckets,
    ZeRO one flat unit per block plus one for the rest of the model.
    """
    if c.dp == 1:
        return 0.0, 0.0
    grads, weights, units = psi * sw.grad_bytes, psi * sw.param_bytes, blocks + 1

    def coll(kind: str, total: float, pieces: float) -> float:
        return pieces * collective(cluster, kind, total / pieces, "dp", c.dp, c.pp, c.tp)

    buckets = max(1, math.ceil(grads / BUCKET_BYTES))
    if c.zero == 0:
        return coll("all_reduce", grads, buckets), coll("all_reduce", grads / buckets, 1)
    gather = coll("all_gather", weights, units)
    if c.zero == 1:
        return coll("all_reduce", grads, buckets) + gather, coll("all_reduce", grads / buckets, 1) + gather
    flag = coll("all_reduce", 4.0, 1)  # ZeRO-2/3: one tiny collective per backward (overflow flags)
    scatter = coll("reduce_scatter", grads, units) + flag
    if c.zero == 2:
        return m * scatter + gather, coll("reduce_scatter", grads / units, 1) + gather
    return m * (2 * gather + scatter), coll("all_gather", weights / units, 1) + coll("reduce_scatter", grads / units, 1)


def _optimizer_time(cluster: Cluster, c: Candidate, shape: ModelShape, psi: float, blocks: int,
                    sw: Software) -> float:
    """Gradient clipping (a norm read and a scale: 12 B/param, the norm summed over the groups
    that shard the gradients) and the AdamW step over this device's (ZeRO-sharded) parameters."""
    dev = cluster.device
    opt_params = psi / (c.dp if c.zero >= 1 else 1)
    clip_params = psi / (c.dp if c.zero >= 2 else 1)
    norm_groups = [g for g, on in (("tp", c.tp > 1), ("pp", c.pp > 1), ("dp", c.zero >= 2)) if on]
    norm = sum(collective(cluster, "all_reduce", 4.0, g, c.dp, c.pp, c.tp) for g in norm_groups)
    if dev.kind == "cpu":
        # plait's AdamW on a CPU runs tensor by tensor; ZeRO steps one flat shard per unit.
        tensors = blocks + 1 if c.zero >= 1 else blocks * (12 if shape.bias else 6) + (4 if shape.bias else 3)
        return (opt_params / dev.rate("adamw_param") + tensors / dev.rate("adamw_tensor")
                + clip_params * 12 / dev.mem_bw + norm)
    return (opt_params * sw.optimizer_bytes_moved + clip_params * 12) / (dev.mem_bw * dev.mem_efficiency) + norm


def _step(shape: ModelShape, cluster: Cluster, c: Candidate, sw: Software, m: int,
          stages: tuple) -> tuple[dict[str, float], float]:
    """(the step's time by part on its slowest stage, the work of all processes together)."""
    dev = cluster.device
    times = _layer_times(shape, cluster, sw, c.micro_batch, c.tp, c.dp, c.pp, c.sequence_parallel,
                         c.recompute)
    blk, embt, hd = times["block"], times["embedding"], times["head"]
    per_stage = [tuple(blocks * blk[i] + (embt[i] if emb else 0.0) + (hd[i] if head else 0.0)
                       for i in range(3)) for emb, blocks, head in stages]  # per micro-batch
    stage_t = [sum(s) for s in per_stage]
    slow = max(range(len(stage_t)), key=stage_t.__getitem__)
    t_fb, p2p = _pipeline(cluster, c, shape, sw, stage_t, m)

    emb0, blocks0, head0 = stages[slow]
    psi = stage_params(shape, c.tp, emb0, blocks0, head0)
    dp_comm, first = _data_parallel_comm(cluster, c, psi, blocks0, m, sw)
    if sw.dp_overlap and dev.kind == "gpu" and c.dp > 1:
        # The reducer overlaps the last micro-batch's backward (all of them for ZeRO 2-3, which
        # reduce every micro-batch); ZeRO-3's gathers prefetch ahead of forward and backward alike.
        # Not on a CPU: Gloo's collectives run on the cores the backward needs.
        window = (m if c.zero >= 2 else 1) * stage_t[slow] * (2 / 3)
        if c.zero == 3:
            window = m * stage_t[slow]
        dp_exposed = max(first, dp_comm - window)
    else:
        dp_exposed = dp_comm

    tied = 0.0
    if c.pp > 1 and not stages[0][2]:  # embedding and head on different stages: their grads are summed
        tied_bytes = shape.vocab * shape.n_embd / c.tp * sw.grad_bytes
        tied = collective(cluster, "all_reduce", tied_bytes, "tied", c.dp, c.pp, c.tp)

    optimizer = _optimizer_time(cluster, c, shape, psi, blocks0, sw)

    gemm, other, tp_comm = (m * x for x in per_stage[slow])
    breakdown = {"matmul": gemm, "other ops": other, "tp comm": tp_comm,
                 "pipeline bubble": t_fb - m * stage_t[slow], "p2p": p2p, "dp comm": dp_exposed,
                 "tied grads": tied, "optimizer": optimizer}
    work = sum(m * t for t in stage_t) * c.dp * c.tp + cluster.devices * (p2p / c.pp + dp_comm
                                                                         + optimizer + tied)
    return breakdown, work


def estimate(shape: ModelShape, cluster: Cluster, cand: Candidate, global_batch: int,
             software: Software = PLAIT) -> Estimate:
    """Predict one step of `cand` training `shape` on `cluster` with `global_batch` sequences."""
    c, sw, dev = cand, software, cluster.device
    if c.dp * c.pp * c.tp != cluster.devices:
        raise PlanError(f"dp×pp×tp = {c.dp}×{c.pp}×{c.tp} = {c.dp * c.pp * c.tp} does not use the "
                        f"{cluster.devices} devices")
    if global_batch % (c.dp * c.micro_batch):
        raise PlanError(f"global batch {global_batch} is not a multiple of dp × micro-batch = "
                        f"{c.dp} × {c.micro_batch}")
    m = global_batch // (c.dp * c.micro_batch)
    cut = "even" if c.schedule == "interleaved" or sw.partition == "even" else c.partition
    bounds = pipeline_cut(shape, c.pp, "flops" if cut == "time" else cut,
                          c.virtual_stages if c.schedule == "interleaved" else 1) if c.pp > 1 else ()
    stages = stage_layers(bounds, c.pp, shape.n_layer) if c.pp > 1 else ((True, shape.n_layer, True),)

    breakdown, work = _step(shape, cluster, c, sw, m, stages)
    step = sum(breakdown.values())
    if dev.kind == "cpu" and cluster.cores:
        # The cores must also do every process's work: the compute, and Gloo's share of the
        # collectives, slower by the measured cost of switching between processes when they
        # outnumber the cores. Synchronisation waits hold no core, so the work is counted
        # without them, and the shared time adds this rank's waits as measured with two
        # processes per core.
        waits = 0.0
        if cluster.sync or cluster.shared_sync:
            free, work = _step(shape, dataclasses.replace(cluster, sync=0.0), c, sw, m, stages)
            shared_waits = dataclasses.replace(cluster, sync=cluster.shared_sync)
            waits = sum(_step(shape, shared_waits, c, sw, m, stages)[0].values()) - sum(free.values())
        shared = work * cluster.shared_compute * cluster.threads / cluster.cores + waits
        if shared > step:
            breakdown["core sharing"] = shared - step
            step = shared

    mem = device_memory(Dims(shape, c.micro_batch, c.tp, c.sequence_parallel, dev.act_bytes,
                             _residual_bytes(sw, cluster)),
                        sw, stages, dp=c.dp, pp=c.pp, m=m, zero=c.zero, recompute=c.recompute,
                        schedule=c.schedule if c.pp > 1 else "none",
                        virtual_stages=c.virtual_stages if c.schedule == "interleaved" else 1)
    tokens = global_batch * shape.seq / step
    model = shape.flops_per_token() * tokens / cluster.devices
    hardware = shape.hardware_flops_per_token(c.recompute) * tokens / cluster.devices
    return Estimate(cand, m, step, breakdown, mem, mem.total <= USABLE_MEMORY * dev.mem_bytes, tokens,
                    model, hardware, model / dev.peak_flops)
