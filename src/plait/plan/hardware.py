"""The hardware table: devices (peak FLOP/s, memory, bandwidth), links, and clusters of them.

Figures are vendors' datasheet numbers (dense bf16 tensor-core peaks, no sparsity) and, where the
planner needs what software reaches rather than what silicon promises, published measurements
(cited per entry). "this CPU" is not in the table: it is measured on the spot
(`plait.plan.calibrate`), because a CPU's speed depends on its cores, caches and load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.errors import PlanError

GB = 1e9


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU process) as the cost model sees it.

    GPUs are timed by a roofline (Williams et al. 2009): an op takes the longer of its FLOPs at the
    achievable matmul rate and its bytes at the achievable memory bandwidth, plus a launch. CPUs
    are timed by measured per-op rates (`rates`), since their elementwise ops are compute-bound.
    """

    name: str
    kind: str                   # "gpu" or "cpu"
    peak_flops: float           # dense bf16 tensor-core peak (GPU); measured fp32 matmul rate (CPU)
    mem_bytes: float
    mem_bw: float               # bytes/s, datasheet
    matmul_efficiency: float = 1.0  # achievable share of peak for large GEMMs
    sustained_clock: float = 1.0    # clock held under full load / boost clock
    attention_efficiency: tuple[float, float] = (0.5, 0.5)  # fused attention fwd, bwd share of peak
    mem_efficiency: float = 0.9     # achievable share of datasheet bandwidth for streaming kernels
    sms: int = 0                # streaming multiprocessors (wave quantization); 0 = none
    launch_s: float = 4e-6      # per-kernel overhead: eager dispatch + launch
    act_bytes: int = 2          # bytes per activation element (bf16 autocast 2, fp32 4)
    rates: tuple[tuple[str, float], ...] = ()  # CPU: measured per-op rates, (kind, per second)
    source: str = ""

    def rate(self, kind: str) -> float:
        for name, value in self.rates:
            if name == kind:
                return value
        raise KeyError(f"device {self.name} has no measured rate for {kind!r}")

    @property
    def matmul_flops(self) -> float:
        return self.peak_flops * self.matmul_efficiency * self.sustained_clock


@dataclass(frozen=True)
class Link:
    """An interconnect, per device and direction: bandwidth, achievable share, per-message latency."""

    name: str
    bw: float
    efficiency: float
    latency_s: float
    source: str = ""

    @property
    def beta(self) -> float:
        """Achievable bytes/s."""
        return self.bw * self.efficiency


# Datasheets: NVIDIA A100 (2021), H100 and H200 (2024), DGX B200 (2024) tensor-core dense bf16
# peaks and HBM bandwidths. Achievable matmul shares: Bekman, "Machine Learning Engineering",
# Maximum Achievable Matmul FLOPS (MAMF) table (best bf16 shape, mean of 100 runs). Sustained clock:
# NVIDIA quotes A100 HPL Rpeak at the 1305 MHz it holds at its power limit against its 1410 MHz
# boost; the Hopper and Blackwell parts are taken to hold their boost no better. Fused attention:
# FlashAttention-2 (Dao 2023) reaches ~70% (forward) and ~60% (backward) of A100 peak and ~35% of
# H100 peak. SM counts: the architecture whitepapers.
_HELD = 1305 / 1410
GPUS: dict[str, Device] = {d.name: d for d in (
    Device("a100", "gpu", 312e12, 80 * GB, 2.039e12, 0.869, _HELD, (0.70, 0.60), sms=108,
           source="A100 SXM4 80GB datasheet; MAMF 271.2 of 312 TFLOP/s"),
    Device("a100-40gb", "gpu", 312e12, 40 * GB, 1.555e12, 0.869, _HELD, (0.70, 0.60), sms=108,
           source="A100 SXM4 40GB datasheet; MAMF 271.2 of 312 TFLOP/s"),
    Device("h100", "gpu", 989e12, 80 * GB, 3.35e12, 0.803, _HELD, (0.35, 0.30), sms=132,
           source="H100 SXM5 datasheet; MAMF 794.5 of 989 TFLOP/s"),
    Device("h200", "gpu", 989e12, 141 * GB, 4.8e12, 0.803, _HELD, (0.35, 0.30), sms=132,
           source="H200 SXM datasheet; MAMF as H100 (same compute)"),
    Device("b200", "gpu", 2250e12, 180 * GB, 8.0e12, 0.776, _HELD, (0.35, 0.30), sms=148,
           source="DGX B200 datasheet (per GPU); MAMF 1745 of 2250 TFLOP/s"),
)}

# Per device and direction. NVLink: A100 12 links × 25 GB/s, H100/H200 18 × 25, B200 18 × 50.
# InfiniBand HDR 200 Gb/s and NDR 400 Gb/s per HCA (one HCA per GPU in DGX nodes). Achievable
# shares: nccl-tests all-reduce bus bandwidth on DGX systems (~230 of 300 GB/s on A100 NVLink,
# ~180-190 of 200 GB/s per node over 8 HDR HCAs). Latencies are per ring step, small-message
# order of magnitude.
LINKS: dict[str, Link] = {k.name: k for k in (
    Link("nvlink3", 300 * GB, 0.78, 3e-6, "A100 NVLink3: 600 GB/s bidirectional"),
    Link("nvlink4", 450 * GB, 0.80, 3e-6, "H100/H200 NVLink4: 900 GB/s bidirectional"),
    Link("nvlink5", 900 * GB, 0.80, 3e-6, "B200 NVLink5: 1.8 TB/s bidirectional"),
    Link("pcie4", 32 * GB, 0.80, 5e-6, "PCIe 4.0 x16"),
    Link("pcie5", 64 * GB, 0.80, 5e-6, "PCIe 5.0 x16"),
    Link("ib-hdr", 25 * GB, 0.92, 5e-6, "InfiniBand HDR 200 Gb/s per GPU"),
    Link("ib-ndr", 50 * GB, 0.92, 5e-6, "InfiniBand NDR 400 Gb/s per GPU"),
    Link("eth-100g", 12.5 * GB, 0.85, 20e-6, "100 GbE per node"),
    Link("eth-25g", 3.125 * GB, 0.85, 30e-6, "25 GbE per node"),
)}
# (intra-node link, inter-node link, NICs per node) of each GPU's usual node (DGX/HGX, 8 GPUs).
NODES: dict[str, tuple[str, str, int]] = {
    "a100": ("nvlink3", "ib-hdr", 8), "a100-40gb": ("nvlink3", "ib-hdr", 8),
    "h100": ("nvlink4", "ib-ndr", 8), "h200": ("nvlink4", "ib-ndr", 8), "b200": ("nvlink5", "ib-ndr", 8),
}


@dataclass(frozen=True)
class Cluster:
    """`devices` devices, `per_node` to a node; links inside and between nodes.

    `nics_per_node` inter-node links serve each node; CPU "clusters" are processes on one host
    that share `cores` cores (`threads` each), with Gloo's α and β measured per kind and the
    synchronisation cost σ each ring step of a collective issued between compute pays on top
    (`plait.plan.calibrate`).
    """

    device: Device
    devices: int
    per_node: int
    intra: Link
    inter: Link
    nics_per_node: int = 1
    cores: float = 0        # CPU only: cores the processes share (0 = one device per core or GPU)
    threads: int = 1        # CPU only: threads per process
    collectives: tuple[tuple[str, float, float], ...] = ()  # measured (kind, α, β), overriding the links
    sync: float = 0.0           # measured σ: seconds each ring step waits beyond α–β in a step
    shared_sync: float = 0.0    # CPU only: σ in the cores' shared time (processes taking turns)
    shared_compute: float = 1.0  # CPU only: work's slowdown when the processes outnumber the cores

    @property
    def nodes(self) -> int:
        return math.ceil(self.devices / self.per_node)

    def group_beta(self, size: int, stride: int) -> tuple[float, float]:
        """(α, β) of a ring over `size` devices spaced `stride` ranks apart (plait's mesh puts tp
        innermost, then dp, then pp). Inside a node the ring runs on the intra-node link; across
        nodes each node's NICs are shared by the per_node/k sibling groups that run at once, k being
        this group's members per node (NCCL's one ring per NIC)."""
        span = size * stride
        if span <= self.per_node or self.devices <= self.per_node:
            return self.intra.latency_s, self.intra.beta
        k = max(1, self.per_node // stride) if stride < self.per_node else 1
        k = min(k, size)
        per_member = self.inter.beta * self.nics_per_node / self.per_node
        return self.inter.latency_s, min(self.intra.beta, k * per_member)


def gpu_cluster(gpu: str, gpus: int, nodes: int | None = None, intra: str | None = None,
                inter: str | None = None) -> Cluster:
    """`gpus` GPUs of kind `gpu` in `nodes` nodes (default: 8 per node), default links per kind."""
    key = gpu.strip().lower()
    if key not in GPUS:
        raise PlanError(f"--gpu {gpu!r} is unknown; valid: {', '.join(GPUS)} (or cpu)")
    if gpus < 1:
        raise PlanError(f"--gpus {gpus} must be ≥ 1")
    intra_name, inter_name, nics = NODES[key]
    intra_name, inter_name = intra or intra_name, inter or inter_name
    for name in (intra_name, inter_name):
        if name not in LINKS:
            raise PlanError(f"link {name!r} is unknown; valid: {', '.join(LINKS)}")
    if nodes is None:
        per_node = min(gpus, 8)
    else:
        if nodes < 1 or gpus % nodes:
            raise PlanError(f"--nodes {nodes} must divide --gpus {gpus}")
        per_node = gpus // nodes
    if inter_name.startswith("eth"):
        nics = 1
    return Cluster(GPUS[key], gpus, per_node, LINKS[intra_name], LINKS[inter_name], nics_per_node=nics)


def cpu_cluster(calibration: dict, processes: int, threads: int = 1) -> Cluster:
    """`processes` CPU processes of `threads` threads on this host, from a calibration record
    (`plait.plan.calibrate.calibrate_cpu`)."""
    c = calibration
    device = Device("cpu", "cpu", c["matmul_flops"], c["mem_bytes"], c["mem_bw"], act_bytes=4,
                    launch_s=c["op_overhead_s"], rates=tuple(sorted(c["rates"].items())),
                    source=f"measured on this CPU ({c.get('cpu', '?')}, {c.get('threads', 1)} thread)")
    gloo = c["gloo"]
    loop = Link("gloo-loopback", gloo["all_reduce"][1], 1.0, gloo["all_reduce"][0], "measured Gloo all-reduce")
    kinds = tuple((kind, alpha, beta) for kind, (alpha, beta) in sorted(gloo.items()))
    # Synchronisation costs and the compute slowdown were measured with one process per core and
    # with two. Up to one per core, a rank that waits leaves its core idle and pays σ to wake. With
    # more processes than cores, no core idles while another process can run: a rank's own path
    # (compute as if on a core of its own) is then a lower bound without σ, and the cores' shared
    # time takes the two-per-core σ and slowdown, the slowdown growing from none at one per core
    # to its measure at two.
    per_core = processes * threads / c["cores"]
    sync = c.get("gloo_sync", 0.0) if per_core <= 1 else 0.0
    shared_sync = c.get("gloo_sync_oversubscribed", 0.0) if per_core > 1 else sync
    slowdown = 1.0 + (c.get("oversubscribed_compute", 1.0) - 1.0) * min(max(per_core - 1.0, 0.0), 1.0)
    return Cluster(device, processes, processes, loop, loop, cores=c["cores"], threads=threads,
                   collectives=kinds, sync=sync, shared_sync=shared_sync, shared_compute=slowdown)

