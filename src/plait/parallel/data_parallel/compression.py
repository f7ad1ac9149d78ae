"""Gradient compression as communication hooks of the data-parallel reducer.

Each hook reduces one bucket (its gradients, then one used-flag per parameter) and leaves the sum
over the dp group in the bucket, as :data:`plait.parallel.data_parallel.reducer.CommHook` requires; the reducer
then averages. The used-flags always arrive exact: they are small integers that bf16/fp16
represent exactly (up to 256 ranks), or they travel beside the compressed part in full precision.

- :class:`CastHook` ("bf16", "fp16"): all-reduce in half precision; half the bytes. fp16 divides
  by the group size before the sum and multiplies back after, to stay inside its range.
- :class:`PowerSGDHook` ("powersgd", Vogels et al., 2019): each gradient matrix M (n×m, with its
  error feedback added) is sent as P = MQ (n×r) and Q = MᵀP̂ (m×r) with P̂ orthonormalised after
  the first sum; the sum is approximated by P̂Qᵀ. Q is kept from one step to the next (warm
  start); what the approximation missed is added to the next step's gradient (error feedback).
  Vectors (biases, norms) and matrices too small to gain are sent uncompressed, with the flags
  and the Ps in one all-reduce; the Qs take a second one.
- :class:`TopKHook` ("topk"): each rank sends only the largest-magnitude `ratio` of its bucket
  (values and int32 indices, gathered from all ranks and summed); the rest is kept as error
  feedback for the next step.

PowerSGD and top-k send uncompressed for the first `parallel.compression_warmup` steps
(:class:`Warmup`). Their error feedback, Q matrices and warm-up count are per-rank state that
checkpoints carry (`state_dict` / `load_state_dict`): a run resumed under the same layout goes on
exactly where it stopped; under another layout (world size, buckets) the state would not fit,
and `fits` says so before anything is loaded.

Every hook counts its bytes in `stats` (:class:`~plait.parallel.data_parallel.hooks.WireStats`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import ParallelConfig
from plait.errors import ConfigError
from plait.parallel.data_parallel.hooks import Pending, WireStats, counted_all_reduce, group_size
from plait.parallel.data_parallel.reducer import Bucket
from plait.parallel.collectives import all_gather_flat


class CastHook:
    """All-reduce the bucket in a 16-bit float type ("bf16" or "fp16")."""

    def __init__(self, dtype: torch.dtype, world: int):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"CastHook dtype {dtype} is invalid; valid: torch.bfloat16, torch.float16")
        if world > 256:  # the summed used-flags must stay exact integers
            raise ConfigError(f"parallel.compression with a 16-bit type needs dp ≤ 256, got dp={world}")
        self.dtype = dtype
        self.stats = WireStats()

    def __call__(self, bucket: Bucket, group) -> Pending:
        n = group_size(group)
        prescale = self.dtype == torch.float16 and n > 1
        if prescale:
            send = bucket.buffer.clone()
            send[:bucket.numel].div_(n)
            send = send.to(self.dtype)
        else:
            send = bucket.buffer.to(self.dtype)
        self.stats.all_reduce(send, n)
        work = dist.all_reduce(send, group=group, async_op=True)

        def finish() -> None:
            bucket.buffer.copy_(send)
            if prescale:
                bucket.grads.mul_(n)

        return Pending(work, finish)


class Warmup:
    """Counts synchronised steps (one call for bucket 0 each) and says when compression starts.

    Error-feedback compressors follow the uncompressed all-reduce for the first `steps` steps,
    as torch's PowerSGD hook does with `start_powerSGD_iter`: with Adam, compressing the large,
    fast-changing gradients of the first steps costs accuracy that error feedback never repays.
    """

    def __init__(self, steps: int):
        if steps < 0:
            raise ConfigError(f"parallel.compression_warmup={steps} must be ≥ 0")
        self.steps = steps
        self.seen = 0

    def compressing(self, bucket: Bucket) -> bool:
        if bucket.index == 0:
            self.seen += 1
        return self.seen > self.steps


def _key(bucket: int, slot: int) -> str:
    return f"{bucket}/{slot}"


def _shapes_fit(saved: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> bool:
    """Every saved tensor names a slot of this run's buckets and has that slot's shape."""
    return isinstance(saved, dict) and all(
        k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) == expected[k]
        for k, v in saved.items())


def _copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies, so saved and loaded state never aliases the tensors the hook updates."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The 2-D view PowerSGD compresses: (first dimension, everything else)."""
    return p.shape[0], p.numel() // p.shape[0]


# Function-level entry points: the hooks below use them on buckets, and federated clients
# (plait.fl.compress) on whole-model updates, so both compress with the same math.


def low_rank_pays(n: int, m: int, rank: int) -> bool:
    """Whether rank-`rank` factors (n×r and m×r) are smaller than the n×m matrix itself."""
    return rank * (n + m) < n * m


def powersgd_factors(m: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One PowerSGD power step on one worker's matrix: P̂ = orth(M Q), Q' = Mᵀ P̂, so M ≈ P̂ Q'ᵀ.

    Q (m×r) is the warm start; Q' is the next one. The hook sums P and Q' over ranks in between.
    """
    p_hat = torch.linalg.qr(m @ q, mode="reduced").Q
    return p_hat, m.t() @ p_hat


def topk_indices(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ⌈ratio·n⌉ (at least one) largest-magnitude entries of a flat tensor."""
    k = max(1, math.ceil(ratio * values.numel()))
    return values.abs().topk(k, sorted=False).indices


class PowerSGDHook:
    """Rank-`rank` PowerSGD with error feedback and warm start; see the module docstring."""

    def __init__(self, rank: int, warmup: int = 0, seed: int = 0):
        if rank < 1:
            raise ConfigError(f"parallel.powersgd_rank={rank} must be ≥ 1")
        self.rank = rank
        self.seed = seed
        self.warmup = Warmup(warmup)
        self.stats = WireStats()
        self.q: dict[str, torch.Tensor] = {}  # "bucket/slot" -> Q (m×r), warm start
        self.error: dict[str, torch.Tensor] = {}  # "bucket/slot" -> error feedback (n×m)

    def state_dict(self) -> dict:
        """This rank's compression state: warm-up count, warm-start Qs and error feedback."""
        return {"kind": "powersgd", "rank": self.rank, "seen": self.warmup.seen,
                "q": _copies(self.q), "error": _copies(self.error)}

    def fits(self, state: dict, buckets: list[Bucket]) -> bool:
        """Whether `state` was saved by a PowerSGD hook of the same rank over the same buckets."""
        if state.get("kind") != "powersgd" or state.get("rank") != self.rank:
            return False
        mats = {_key(b.index, s): matrix_shape(p) for b in buckets
                for s, p in enumerate(b.params) if self.compresses(p)}
        qs = {k: (m, self.rank) for k, (_, m) in mats.items()}
        return (isinstance(state.get("seen"), int) and _shapes_fit(state.get("q"), qs)
                and _shapes_fit(state.get("error"), mats))

    def load_state_dict(self, state: dict) -> None:
        self.warmup.seen = int(state["seen"])
        self.q, self.error = _copies(state["q"]), _copies(state["error"])

    def reset(self) -> None:
        self.warmup.seen, self.q, self.error = 0, {}, {}

    def check(self, model: nn.Module) -> None:
        """Refuse a rank larger than a gradient matrix's smaller dimension, naming the parameter."""
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() >= 2:
                n, m = matrix_shape(p)
                if self.rank > min(n, m):
                    raise ConfigError(
                        f"parallel.powersgd_rank={self.rank} exceeds the smaller dimension of the "
                        f"gradient of {name!r} (as a {n}×{m} matrix); valid: 1..{min(n, m)}")

    def compresses(self, p: torch.Tensor) -> bool:
        if p.dim() < 2:
            return False
        n, m = matrix_shape(p)
        return low_rank_pays(n, m, self.rank)

    def _initial_q(self, m: int, like: torch.Tensor) -> torch.Tensor:
        # The same Q on every rank: the sum of the Ps is only meaningful for a shared Q.
        g = torch.Generator().manual_seed(self.seed + m)
        return torch.randn(m, self.rank, generator=g).to(like)

    def __call__(self, bucket: Bucket, group) -> Pending:
        n_ranks = group_size(group)
        if not self.warmup.compressing(bucket):
            return counted_all_reduce(bucket, group, self.stats)
        grads = bucket.grads
        mats, plain = [], []
        for slot, p in enumerate(bucket.params):
            off = bucket.offsets[slot]
            view = grads[off:off + p.numel()]
            (mats if self.compresses(p) else plain).append((slot, p, view))
        ms, ps = [], []
        for slot, p, view in mats:
            key = _key(bucket.index, slot)
            m = view.view(matrix_shape(p))
            if key in self.error:
                m.add_(self.error[key])  # error feedback, in place: the bucket is rewritten below
            if key not in self.q:
                self.q[key] = self._initial_q(m.shape[1], m)
            ms.append(m)
            ps.append(m @ self.q[key])
        first = torch.cat([v for _, _, v in plain] + [bucket.flags] + [p.reshape(-1) for p in ps])
        self.stats.all_reduce(first, n_ranks)
        work = dist.all_reduce(first, group=group, async_op=True)

        def finish() -> None:
            at = 0
            for _, _, v in plain:
                v.copy_(first[at:at + v.numel()])
                at += v.numel()
            bucket.flags.copy_(first[at:at + bucket.flags.numel()])
            at += bucket.flags.numel()
            if not mats:
                return
            p_hats = []
            for p in ps:
                p_sum = first[at:at + p.numel()].view_as(p)
                at += p.numel()
                p_hats.append(torch.linalg.qr(p_sum, mode="reduced").Q)
            qs = [m.t() @ p_hat for m, p_hat in zip(ms, p_hats)]
            second = torch.cat([q.reshape(-1) for q in qs])
            self.stats.all_reduce(second, n_ranks)
            dist.all_reduce(second, group=group)
            at = 0
            for (slot, _, _), m, p_hat, q in zip(mats, ms, p_hats, qs):
                q_sum = second[at:at + q.numel()].view_as(q)
                at += q.numel()
                approx_sum = p_hat @ q_sum.t()
                key = _key(bucket.index, slot)
                self.error[key] = m - approx_sum / n_ranks  # what the average approximation missed
                self.q[key] = q_sum / n_ranks  # warm start for the next step
                m.copy_(approx_sum)

        return Pending(work, finish)


class TopKHook:
    """Send the `ratio` largest-magnitude entries of each bucket; keep the rest as error feedback."""

    def __init__(self, ratio: float, warmup: int = 0):
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"parallel.topk_ratio={ratio} must be in (0, 1]")
        self.ratio = ratio
        self.warmup = Warmup(warmup)
        self.stats = WireStats()
        self.error: dict[str, torch.Tensor] = {}  # "bucket" -> error feedback

    def state_dict(self) -> dict:
        """This rank's compression state: warm-up count and error feedback."""
        return {"kind": "topk", "seen": self.warmup.seen,
                "error": _copies(self.error)}

    def fits(self, state: dict, buckets: list[Bucket]) -> bool:
        """Whether `state` was saved by a top-k hook over the same buckets."""
        return (state.get("kind") == "topk" and isinstance(state.get("seen"), int)
                and _shapes_fit(state.get("error"), {str(b.index): (b.numel,) for b in buckets}))

    def load_state_dict(self, state: dict) -> None:
        self.warmup.seen = int(state["seen"])
        self.error = _copies(state["error"])

    def reset(self) -> None:
        self.warmup.seen, self.error = 0, {}

    def __call__(self, bucket: Bucket, group) -> Pending:
        n_ranks = group_size(group)
        if not self.warmup.compressing(bucket):
            return counted_all_reduce(bucket, group, self.stats)
        grads = bucket.grads
        key = str(bucket.index)
        if key in self.error:
            grads.add_(self.error[key])
        idx = topk_indices(grads, self.ratio)
        values = grads[idx]
        error = grads.clone()
        error[idx] = 0
        self.error[key] = error
        # One byte-level message per rank: values | flags | int32 indices (bits moved, not summed).
        mine = torch.cat([values.view(torch.uint8), bucket.flags.reshape(-1).view(torch.uint8),
                          idx.to(torch.int32).view(torch.uint8)])
        every = torch.empty(n_ranks * mine.numel(), dtype=torch.uint8, device=mine.device)
        self.stats.all_gather(mine, n_ranks)
        work = all_gather_flat(every, mine, group, n_ranks, async_op=True)
        vbytes = values.numel() * values.element_size()
        fbytes = bucket.flags.numel() * bucket.flags.element_size()

        def finish() -> None:
            grads.zero_()
            bucket.flags.zero_()
            for msg in every.view(n_ranks, -1):
                vals = msg[:vbytes].view(values.dtype)
                flags = msg[vbytes:vbytes + fbytes].view(bucket.flags.dtype)
                where = msg[vbytes + fbytes:].view(torch.int32).long()
                grads.index_add_(0, where, vals)
                bucket.flags.add_(flags)

        return Pending(work, finish)


def build_compression_hook(cfg: ParallelConfig, model: nn.Module, dp: int):
    """The hook for `parallel.compression`, or None for "none"."""
    kind = cfg.compression
    if kind == "none":
        return None
    if kind in ("bf16", "fp16"):
        return CastHook(torch.bfloat16 if kind == "bf16" else torch.float16, dp)
    if kind == "powersgd":
        hook = PowerSGDHook(cfg.powersgd_rank, warmup=cfg.compression_warmup)
        hook.check(model)
        return hook
    if kind == "topk":
        return TopKHook(cfg.topk_ratio, warmup=cfg.compression_warmup)
    raise ConfigError(f"parallel.compression={kind!r} is invalid; valid: none, bf16, fp16, powersgd, topk")
