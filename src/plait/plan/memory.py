"""Memory per device: weights, gradients, optimizer state (per ZeRO stage), activations.

Model state follows ZeRO (Rajbhandari et al. 2020, §5): with Ψ parameters on a device and N_d
data-parallel ranks, stage 1 keeps 1/N_d of the optimizer state, stage 2 also of the gradients,
stage 3 also of the weights (plus the blocks gathered for use). Activations follow Korthikanti
et al. 2022, Table 2: per block and micro-batch, s·b·h·(34 + 5·a·s/h) bytes with 16-bit
activations; with tensor parallelism s·b·h·(10 + 24/t + 5·a·s/(h·t)); with sequence parallelism
too, s·b·h/t·(34 + 5·a·s/h); selective recomputation drops the 5·a·s/h term (the attention
scores), and so does a fused attention kernel, which never stores them (Dao et al. 2022); full
recomputation keeps only each block's input, 2·s·b·h (÷t with sequence parallelism), plus one
block's activations while it is replayed. A pipeline stage holds the activations of the
micro-batches in flight: all m with GPipe, at most p − rank with 1F1B (Narayanan et al. 2021),
times 1 + (p−1)/(p·v) with v interleaved chunks (Korthikanti et al. 2022 §4.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.ops import Dims
from plait.plan.shapes import ModelShape
from plait.plan.software import Software


@dataclass(frozen=True)
class Memory:
    """Bytes on one device (the fullest one)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def stage_params(shape: ModelShape, tp: int, emb: bool, blocks: int, head: bool) -> float:
    """Parameters held by one device of a stage: matmul weights, column biases and the
    vocabulary split over tp; row biases, norms and positions replicated."""
    h, v = shape.n_embd, shape.vocab
    bias = shape.bias
    split = 12 * h * h + ((3 * h + 4 * h) if bias else 0)
    replicated = shape.block_params() - 12 * h * h - ((3 * h + 4 * h) if bias else 0)
    n = blocks * (split / tp + replicated)
    if emb:
        n += v * h / tp + shape.seq * h
    if head:
        n += shape.norm_params() + (0 if emb else v * h / tp)  # the head is tied to the embedding
    return n


def model_state(psi: float, dp: int, zero: int, sw: Software) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) in bytes for Ψ parameters on one device: ZeRO
    (Rajbhandari et al. 2020, Figure 1) divides the optimizer state by N_d from stage 1, the
    gradients from stage 2, the weights from stage 3."""
    shard = 1.0 / dp
    weights = psi * (sw.param_bytes * (shard if zero >= 3 else 1.0) + sw.weight_copy_bytes)
    grads = psi * sw.grad_bytes * (shard if zero >= 2 else 1.0)
    optim = psi * sw.optim_bytes * (shard if zero >= 1 else 1.0)
    return weights, grads, optim


def block_activations(d: Dims, recompute: str, flash: bool) -> tuple[float, float]:
    """(bytes kept per block and micro-batch, bytes of one block's full activations)."""
    s, b, h, a, t = d.shape.seq, d.b, d.shape.n_embd, d.shape.n_head, d.t
    scores = 0.0 if flash else 5.0 * a * s / h
    if d.sp:
        full = s * b * h / t * (34 + scores)
    else:
        full = s * b * h * (10 + 24 / t + scores / t)
    scale = d.e / 2  # Table 2 counts 16-bit activations
    full *= scale
    if recompute == "full":
        kept = 2.0 * s * b * h / (t if d.sp else 1) * scale
    elif recompute == "selective":
        no_scores = s * b * h * (34 / t if d.sp else 10 + 24 / t)
        kept = no_scores * scale
    else:
        kept = full
    return kept, full


def device_memory(d: Dims, sw: Software, stages: tuple[tuple[bool, int, bool], ...], *, dp: int, pp: int,
                  m: int, zero: int, recompute: str, schedule: str, virtual_stages: int) -> Memory:
    """Memory of the fullest device over the pipeline stages."""
    flash = sw.attention == "flash"
    kept, full = block_activations(d, recompute, flash)
    best: Memory | None = None
    seen = set()
    for rank, (emb, blocks, head) in enumerate(stages):
        if (emb, blocks, head) in seen:  # a later rank holds fewer micro-batches in flight
            continue
        seen.add((emb, blocks, head))
        psi = stage_params(d.shape, d.t, emb, blocks, head)
        weights, grads, optim = model_state(psi, dp, zero, sw)
        if zero >= 3:  # two blocks gathered at a time (the one running and the prefetched next)
            weights += 2 * stage_params(d.shape, d.t, False, 1, False) * sw.param_bytes
        if pp == 1 or schedule == "naive":
            in_flight = 1.0
        elif schedule == "gpipe":
            in_flight = float(m)
        else:
            in_flight = float(min(m, pp - rank))
            if schedule == "interleaved":
                in_flight *= 1 + (pp - 1) / (pp * virtual_stages)
        acts = blocks * kept * in_flight + (full if recompute != "none" and blocks else 0.0)
        acts += d.n * d.shape.n_embd * d.er * in_flight * (1 if emb else 0)  # embedding output
        logits = d.n * d.shape.vocab / d.t * (d.e + 8) if head else 0.0  # logits, fp32 copy and grad
        mem = Memory(weights, grads, optim, acts, logits)
        if best is None or mem.total > best.total:
            best = mem
    assert best is not None
    return best
