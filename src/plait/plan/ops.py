"""The work of one micro-batch on one device, op by op: what the cost model times.

Each GPT block is listed as its kernels (matmuls, attention, norms, GELU, residual adds) with
FLOPs and bytes moved, plus the tensor-parallel collectives between them (Megatron-LM,
Shoeybi et al. 2019: an all-reduce after each row-parallel layer in forward and before each
column-parallel layer in backward; with sequence parallelism, Korthikanti et al. 2022, each
becomes an all-gather plus a reduce-scatter of the same volume). Backward repeats each matmul
twice (input and weight gradients); activation recomputation replays the forward
(full, Chen et al. 2016) or only its cheap, memory-hungry part (selective, Korthikanti et al.
2022; plait keeps the matmul outputs and replays attention, GELU, norms and adds).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.plan.shapes import ModelShape
from plait.plan.software import Software


@dataclass(frozen=True)
class Op:
    """One kernel (or `count` alike). kind: gemm | attn_fwd | attn_bwd | gelu | gelu_bwd | norm |
    norm_bwd | xent | xent_bwd | memory."""

    kind: str
    flops: float = 0.0
    bytes: float = 0.0
    elements: float = 0.0
    mnk: tuple[int, int, int] = (0, 0, 0)
    count: int = 1


@dataclass(frozen=True)
class Comm:
    """A collective over one mesh group: all_reduce | reduce_scatter | all_gather | p2p."""

    kind: str
    group: str
    bytes: float


Work = tuple[list[Op], list[Comm]]


@dataclass(frozen=True)
class Dims:
    """What one micro-batch looks like on one device."""

    shape: ModelShape
    b: int            # sequences per micro-batch
    t: int            # tensor-parallel size
    sp: bool          # sequence parallelism
    e: int            # bytes per activation element (matmul inputs and outputs)
    er: int           # bytes per residual-stream element

    @property
    def n(self) -> int:
        return self.b * self.shape.seq

    @property
    def nr(self) -> float:
        """Tokens of the residual stream held per device (split over tp with sequence parallelism)."""
        return self.n / self.t if self.sp else float(self.n)


def _gemm(m: float, k: float, n: float, e: int) -> Op:
    return Op("gemm", 2.0 * m * k * n, e * (m * k + k * n + m * n), mnk=(int(m), int(k), int(n)))


def _gemm_bwd(m: float, k: float, n: float, e: int) -> list[Op]:
    """Input gradient (m×n · n×k) and weight gradient (k×m · m×n): each the forward's FLOPs."""
    return [_gemm(m, n, k, e), _gemm(k, m, n, e)]


def _tp_in(d: Dims, what: float) -> list[Comm]:
    """Collectives that bring a replicated input into a column-parallel layer (forward)."""
    return [Comm("all_gather", "tp", what)] if d.t > 1 and d.sp else []


def _tp_out(d: Dims, what: float) -> list[Comm]:
    """After a row-parallel layer (forward): sum the partial outputs over tp."""
    if d.t == 1:
        return []
    return [Comm("reduce_scatter" if d.sp else "all_reduce", "tp", what)]


def _tp_back(d: Dims, what: float) -> list[Comm]:
    """Backward of one column/row pair: the conjugate collectives (Megatron's f and g)."""
    if d.t == 1:
        return []
    if d.sp:
        return [Comm("all_gather", "tp", what), Comm("reduce_scatter", "tp", what)]
    return [Comm("all_reduce", "tp", what)]


def _sp_copies(d: Dims, sw: Software, count: int) -> list[Op]:
    """The copies around `count` sequence-parallel collectives, where the software makes them."""
    if d.t == 1 or not d.sp or not sw.sp_copies:
        return []
    return [Op("memory", bytes=2.0 * d.e * d.n * d.shape.n_embd)] * count


def _attention_fwd(d: Dims, sw: Software) -> list[Op]:
    s, h, t, e, b = d.shape.seq, d.shape.n_embd, d.t, d.e, d.b
    heads = d.shape.n_head / t
    if sw.attention == "flash":
        # QK^T and PV: 4·b·s²·h/t FLOPs; a causal fused kernel skips the masked half.
        return [Op("attn_fwd", 0.5 * 4.0 * b * s * s * h / t, e * 4.0 * d.n * h / t, elements=b * heads)]
    scores = b * heads * s * s
    ops = [Op("gemm", 2.0 * d.n * s * h / t, e * (2.0 * d.n * h / t + scores)),   # QK^T (batched)
           Op("memory", bytes=2.0 * e * scores)]                                   # scale-mask-softmax
    if d.shape.dropout > 0:
        ops.append(Op("memory", bytes=(2.0 * e + 1) * scores))                      # dropout on probs
    ops.append(Op("gemm", 2.0 * d.n * s * h / t, e * (scores + 2.0 * d.n * h / t)))  # PV (batched)
    return ops


def _attention_bwd(d: Dims, sw: Software) -> list[Op]:
    s, h, t, e, b = d.shape.seq, d.shape.n_embd, d.t, d.e, d.b
    heads = d.shape.n_head / t
    if sw.attention == "flash":
        # FlashAttention's backward recomputes the scores: 2.5× the forward's matmul work (Dao 2023).
        return [Op("attn_bwd", 2.5 * 0.5 * 4.0 * b * s * s * h / t, e * 8.0 * d.n * h / t,
                   elements=b * heads)]
    scores = b * heads * s * s
    ops = [Op("gemm", 2.0 * d.n * s * h / t, e * (scores + 2.0 * d.n * h / t)),   # dP = dO·Vᵀ
           Op("gemm", 2.0 * d.n * s * h / t, e * (scores + 2.0 * d.n * h / t))]   # dV = Pᵀ·dO
    if d.shape.dropout > 0:
        ops.append(Op("memory", bytes=(2.0 * e + 1) * scores))
    ops += [Op("memory", bytes=3.0 * e * scores),                                  # softmax backward
            Op("gemm", 2.0 * d.n * s * h / t, e * (scores + 2.0 * d.n * h / t)),   # dQ = dS·K
            Op("gemm", 2.0 * d.n * s * h / t, e * (scores + 2.0 * d.n * h / t))]   # dK = dSᵀ·Q
    return ops


def _residual_fwd(d: Dims, sw: Software) -> list[Op]:
    """Dropout and the residual add after a sub-block, on the residual stream."""
    h, er = d.shape.n_embd, d.er
    if sw.fused_bias_dropout_add:
        return [Op("memory", bytes=(3.0 * er + (1 if d.shape.dropout > 0 else 0)) * d.nr * h)]
    ops = [Op("memory", bytes=3.0 * er * d.nr * h)]
    if d.shape.dropout > 0:
        ops.insert(0, Op("memory", bytes=(2.0 * er + 1) * d.nr * h))
    return ops


def _norm(d: Dims) -> Op:
    return Op("norm", elements=d.nr * d.shape.n_embd, bytes=2.0 * d.er * d.nr * d.shape.n_embd)


def _norm_bwd(d: Dims) -> Op:
    return Op("norm_bwd", elements=d.nr * d.shape.n_embd, bytes=3.0 * d.er * d.nr * d.shape.n_embd)


def attention_core(d: Dims, sw: Software) -> list[Op]:
    return _attention_fwd(d, sw)


def block_forward(d: Dims, sw: Software) -> Work:
    """One block's forward: [norm, qkv, attention, proj, add, norm, fc, GELU, proj, add]."""
    n, h, t, e = d.n, d.shape.n_embd, d.t, d.e
    act = n * h * e
    ops = [_norm(d), _gemm(n, h, 3 * h / t, e), *_attention_fwd(d, sw),
           Op("memory", bytes=2.0 * e * n * h / t),          # heads back to (b, s, h): a copy
           _gemm(n, h / t, h, e), *_residual_fwd(d, sw),
           _norm(d), _gemm(n, h, 4 * h / t, e),
           Op("gelu", elements=n * 4 * h / t, bytes=2.0 * e * n * 4 * h / t),
           _gemm(n, 4 * h / t, h, e), *_residual_fwd(d, sw), *_sp_copies(d, sw, 4)]
    comms = [*_tp_in(d, act), *_tp_out(d, act), *_tp_in(d, act), *_tp_out(d, act)]
    return ops, comms


def block_backward(d: Dims, sw: Software) -> Work:
    n, h, t, e = d.n, d.shape.n_embd, d.t, d.e
    act = n * h * e
    resid = 3.0 * d.er * d.nr * h  # the residual gradient summed from both branches
    ops = [Op("memory", bytes=resid), *_gemm_bwd(n, 4 * h / t, h, e),
           Op("gelu_bwd", elements=n * 4 * h / t, bytes=3.0 * e * n * 4 * h / t),
           *_gemm_bwd(n, h, 4 * h / t, e), _norm_bwd(d),
           Op("memory", bytes=resid), *_gemm_bwd(n, h / t, h, e),
           Op("memory", bytes=2.0 * e * n * h / t), *_attention_bwd(d, sw),
           *_gemm_bwd(n, h, 3 * h / t, e), _norm_bwd(d), *_sp_copies(d, sw, 4)]
    if d.shape.dropout > 0:
        ops += [Op("memory", bytes=(2.0 * d.er + 1) * d.nr * h)] * 2
    return ops, [*_tp_back(d, act), *_tp_back(d, act)]


def block_recompute(d: Dims, sw: Software, mode: str) -> Work:
    """What recomputation replays before a block's backward."""
    if mode == "full":
        return block_forward(d, sw)
    if mode == "selective":
        h, e, n, t = d.shape.n_embd, d.e, d.n, d.t
        ops = [_norm(d), *_attention_fwd(d, sw), _norm(d),
               Op("gelu", elements=n * 4 * h / t, bytes=2.0 * e * n * 4 * h / t),
               *_residual_fwd(d, sw), *_residual_fwd(d, sw)]
        return ops, []
    return [], []


def embedding_forward(d: Dims, sw: Software, vocab_parallel: bool) -> Work:
    n, h, er = d.n, d.shape.n_embd, d.er
    ops = [Op("memory", bytes=n * h * (4 + er)),          # token rows gathered (fp32 table)
           Op("memory", bytes=3.0 * er * n * h)]          # + positions
    if d.shape.dropout > 0:
        ops.append(Op("memory", bytes=(2.0 * er + 1) * n * h))
    comms = []
    if vocab_parallel and d.t > 1:  # each rank looks up its vocabulary rows; the rows are summed
        ops += [Op("memory", bytes=3.0 * er * n * h), *_sp_copies(d, sw, 1)]
        comms.append(Comm("reduce_scatter" if d.sp else "all_reduce", "tp", n * h * er))
    return ops, comms


def embedding_backward(d: Dims, vocab_parallel: bool) -> Work:
    n, h, v = d.n, d.shape.n_embd, d.shape.vocab
    rows = v / d.t if vocab_parallel else v
    ops = [Op("memory", bytes=4.0 * rows * h),            # dense gradient of the table, zeroed
           Op("memory", bytes=3.0 * 4 * n * h),           # rows accumulated (index_add)
           Op("memory", bytes=2.0 * 4 * n * h)]           # position gradient (sum over the batch)
    comms = [Comm("all_gather", "tp", n * h * d.er)] if vocab_parallel and d.t > 1 and d.sp else []
    return ops, comms


def head_forward(d: Dims, sw: Software, vocab_parallel: bool) -> Work:
    """Final norm, logits (vocabulary-split with tp), cross-entropy in fp32."""
    n, h, e = d.n, d.shape.n_embd, d.e
    v = d.shape.vocab / d.t if vocab_parallel else d.shape.vocab
    ops = [_norm(d), _gemm(n, h, v, e),
           Op("memory", bytes=n * v * (e + 4)),           # logits cast to fp32 for the loss
           Op("xent", elements=n * v, bytes=8.0 * n * v), *_sp_copies(d, sw, 1)]
    comms = list(_tp_in(d, n * h * e))
    if vocab_parallel and d.t > 1:  # vocab-parallel cross-entropy: max, sum of exps, target logit
        comms += [Comm("all_reduce", "tp", 4.0 * n)] * 3
    return ops, comms


def head_backward(d: Dims, sw: Software, vocab_parallel: bool) -> Work:
    n, h, e = d.n, d.shape.n_embd, d.e
    v = d.shape.vocab / d.t if vocab_parallel else d.shape.vocab
    ops = [Op("xent_bwd", elements=n * v, bytes=12.0 * n * v),
           Op("memory", bytes=n * v * (e + 4)), *_gemm_bwd(n, h, v, e), _norm_bwd(d), *_sp_copies(d, sw, 1)]
    comms = []
    if vocab_parallel and d.t > 1:  # the head's input is replicated: its gradient is summed
        comms.append(Comm("reduce_scatter" if d.sp else "all_reduce", "tp", n * h * e))
    return ops, comms
