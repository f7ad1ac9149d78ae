"""Data parallelism: our own gradient reducer over torch.distributed.

Gradients are packed into flat buckets in reverse registration order (roughly the order backward
produces them). A post-accumulate-grad hook copies each gradient into its bucket as soon as it is
final; when a bucket is full its all-reduce is launched asynchronously, so communication overlaps
the rest of backward. Buckets are always launched in index order, so every rank issues the same
collectives in the same order even when parameters become ready in a different order.

Each bucket carries one extra slot per parameter: a 1 where this rank produced a gradient. After
the sum, a zero count means no rank used the parameter in this step, and its `.grad` stays None,
exactly as in single-process training; otherwise `.grad` is the average over the dp group.

The "naive" mode all-reduces each gradient on its own after backward: the textbook baseline that
shows what bucketing and overlap buy.

When the ranks' batches differ in size (uneven hardware, plait.profile.balance), each rank's
gradient is the mean over its own samples; :meth:`GradientReducer.set_sample_weight` scales it by
n_r · world / N as it enters the reduction, so the average is the mean over all N samples.

Buffers (BatchNorm's running statistics, say) are updated by each rank's forward on its own data,
so they drift apart. As torch DDP does with `broadcast_buffers=True`, the group's first rank's
buffers win: after every synchronised backward they are broadcast from it (started behind the
last gradient buckets, so the transfer overlaps their all-reduce). Every forward then starts from
the first rank's buffers, the values DDP's broadcast before each forward gives, and the ranks
also agree between steps (evaluation, checkpoints). `broadcast_buffers=False` keeps them local.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.errors import ConfigError
from plait.parallel.collectives import broadcast_from_first

log = logging.getLogger(__name__)


@dataclass
class Bucket:
    """One flat bucket: `buffer` holds the gradients (`grads`), then one used-flag per parameter.

    Communication hooks read the parameter layout (`params`, `offsets`) to treat each gradient
    on its own (PowerSGD compresses matrices) and must keep the flags exact.
    """

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    buffer: torch.Tensor  # grads, then one used-flag per parameter
    ready: set[int] = field(default_factory=set)  # indices into params
    work: "Waitable | None" = None
    launched: bool = False

    @property
    def grads(self) -> torch.Tensor:
        return self.buffer[: self.numel]

    @property
    def flags(self) -> torch.Tensor:
        return self.buffer[self.numel:]


class Waitable(Protocol):
    def wait(self) -> Any: ...


# A communication hook starts the reduction of one bucket over the group and returns something to
# wait() on (a dist.Work, or a hook's own object that finishes decompressing in wait()), or None
# when it finished synchronously. After the wait, `bucket.buffer` must hold the element-wise SUM
# over the group of every rank's buffer, gradients and used-flags alike; the reducer then divides
# by the group size. Compression and hierarchical all-reduce plug in here.
CommHook = Callable[[Bucket, "dist.ProcessGroup | None"], "Waitable | None"]


def allreduce_hook(bucket: Bucket, group) -> "dist.Work | None":
    """The default hook: one asynchronous all-reduce of the whole bucket."""
    return dist.all_reduce(bucket.buffer, group=group, async_op=True)


class GradientReducer:
    """Averages gradients over a data-parallel group; attach once to a model.

    After `loss.backward()` returns, every parameter's `.grad` holds the dp-group average (the
    end-of-backward callback waits for the in-flight buckets) and, with `broadcast_buffers`, the
    module's buffers are the group's first rank's. Use :meth:`no_sync` around micro-steps of
    gradient accumulation.
    """

    def __init__(self, module: nn.Module, group: "dist.ProcessGroup | None" = None,
                 bucket_mb: float = 25.0, mode: str = "bucketed", comm_hook: CommHook | None = None,
                 broadcast_params: bool = True, broadcast_buffers: bool = True):
        if mode not in ("bucketed", "naive"):
            raise ConfigError(f"parallel.reducer={mode!r} is invalid; valid: bucketed, naive")
        if bucket_mb <= 0:
            raise ConfigError(f"parallel.bucket_mb={bucket_mb} must be > 0")
        self.module = module
        self.group = group
        self.mode = mode
        self.comm_hook = comm_hook or allreduce_hook
        self.broadcast_buffers = broadcast_buffers
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.sample_weight = 1.0  # this rank's gradient weight in the average (uneven batches)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._sync = True
        self._callback_queued = False
        self._handles = []
        self.buckets: list[Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, slot)
        if broadcast_params and self.world > 1:
            broadcast_from_first(self.module, self.group)
        if mode == "bucketed":
            self._build_buckets(int(bucket_mb * 1024 * 1024))
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    # --- setup ----------------------------------------------------------------------------

    def _build_buckets(self, cap_bytes: int) -> None:
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > cap_bytes or p.dtype != current[0].dtype
                            or p.device != current[0].device):
                self._add_bucket(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self._add_bucket(current)
        log.debug("gradient reducer: %d buckets over %d parameters", len(self.buckets), len(self.params))

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        buf = torch.zeros(n + len(params), dtype=params[0].dtype, device=params[0].device)
        b = len(self.buckets)
        for slot, p in enumerate(params):
            self._where[id(p)] = (b, slot)
        self.buckets.append(Bucket(b, params, offsets, n, buf))

    # --- public API -------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip communication inside: gradients accumulate locally in `.grad`."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def set_sample_weight(self, weight: float) -> None:
        """Weight this rank's gradient by `weight` in the group average: n_r · world / N when this
        rank's batch holds n_r of the step's N samples (1.0, the default, for even batches)."""
        if not weight > 0:
            raise ConfigError(f"a rank's gradient weight must be > 0, got {weight}")
        self.sample_weight = float(weight)

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank hands to all-reduce per synchronised step."""
        if self.mode == "naive":
            return sum(p.numel() * p.element_size() for p in self.params)
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    # --- backward-time machinery -----------------------------------------------------------

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self._sync or self.world == 1:
            return
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        if self.mode == "naive":
            return
        b, slot = self._where[id(p)]
        bucket = self.buckets[b]
        off = bucket.offsets[slot]
        bucket.buffer[off:off + p.numel()].copy_(p.grad.reshape(-1))
        bucket.ready.add(slot)
        # Launch strictly in bucket order so all ranks issue identical collective sequences.
        for bk in self.buckets:
            if bk.launched:
                continue
            if len(bk.ready) < len(bk.params):
                break
            bk.buffer[bk.numel:].fill_(1.0)  # every parameter of a full bucket was used
            self._launch(bk)

    def _launch(self, bucket: Bucket) -> None:
        if self.sample_weight != 1.0:  # the gradients only: the used-flags stay exact
            bucket.grads.mul_(self.sample_weight)
        bucket.work = self.comm_hook(bucket, self.group)
        bucket.launched = True

    def _finish(self) -> None:
        """End of backward: launch what is left, wait, average, and hand gradients back."""
        self._callback_queued = False
        if self.mode == "naive":
            self._finish_naive()
            self._finish_buffers(self._start_buffers())
            return
        for bucket in self.buckets:
            if not bucket.launched:
                # Parameters that produced no gradient in this backward: use what accumulated
                # earlier (no_sync micro-steps) or contribute zeros with a "not used" flag.
                for slot, p in enumerate(bucket.params):
                    if slot in bucket.ready:
                        bucket.buffer[bucket.numel + slot] = 1.0
                        continue
                    off = bucket.offsets[slot]
                    view = bucket.buffer[off:off + p.numel()]
                    if p.grad is None:
                        view.zero_()
                        bucket.buffer[bucket.numel + slot] = 0.0
                    else:
                        view.copy_(p.grad.reshape(-1))
                        bucket.buffer[bucket.numel + slot] = 1.0
                self._launch(bucket)
        buffers = self._start_buffers()
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            grads = bucket.buffer[: bucket.numel]
            grads.div_(self.world)
            used = bucket.buffer[bucket.numel:].tolist()  # one host sync per bucket
            for slot, p in enumerate(bucket.params):
                if used[slot] == 0:
                    p.grad = None
                    continue
                off = bucket.offsets[slot]
                # The averaged gradient is handed over as a view of the bucket (no copy back).
                # The next backward writes into a fresh or zeroed .grad, whose hook copies it in
                # again, so reusing the bucket memory is safe in both zero_grad modes.
                p.grad = grads[off:off + p.numel()].view_as(p)
            bucket.ready.clear()
            bucket.work = None
            bucket.launched = False
        self._finish_buffers(buffers)

    def _start_buffers(self) -> list[tuple[Any, torch.Tensor, list[torch.Tensor]]]:
        """Start broadcasting the module's buffers from the group's first rank, one flat tensor
        per dtype and device; returns (work, flat copy, buffers) for :meth:`_finish_buffers`."""
        if not self.broadcast_buffers:
            return []
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for b in self.module.buffers():  # looked up each time: a module may reassign a buffer
            by_kind.setdefault((b.dtype, b.device), []).append(b)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        started = []
        with torch.no_grad():
            for same in by_kind.values():
                flat = torch.cat([b.reshape(-1) for b in same])
                started.append((dist.broadcast(flat, src=src, group=self.group, async_op=True), flat, same))
        return started

    def _finish_buffers(self, started: list[tuple[Any, torch.Tensor, list[torch.Tensor]]]) -> None:
        """Wait for the buffer broadcasts and copy the first rank's values into the buffers."""
        first = dist.get_rank(self.group) == 0
        with torch.no_grad():
            for work, flat, same in started:
                work.wait()
                if first:
                    continue  # it sent its own values
                for b, value in zip(same, flat.split([b.numel() for b in same])):
                    b.copy_(value.view_as(b))

    def _finish_naive(self) -> None:
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            flag = torch.tensor([0.0 if p.grad is None else 1.0], dtype=p.dtype, device=p.device)
            if self.sample_weight != 1.0:
                grad.mul_(self.sample_weight)
            dist.all_reduce(grad, group=self.group)
            dist.all_reduce(flag, group=self.group)
            if flag.item() == 0:
                p.grad = None
            else:
                grad.div_(self.world)
                p.grad = grad
