"""Point-to-point activation and gradient transfers between pipeline ranks, batched.

Every action boundary posts one `dist.batch_isend_irecv` holding the sends the previous action
produced and the receives the next actions need. A rank only ever blocks on a receive whose data
the schedule's order guarantees the peer will send, or on a send the peer has already consumed:
no schedule that respects its data dependencies can deadlock. A send's buffer must live until the
send completes, but Gloo reports a send complete only once it is waited on, so the runtime tells
`release` which sends a peer has consumed (it has received a later message from that peer); they
are waited on (at once: their data has arrived) and dropped, so the buffers held at once follow
the pipeline depth, not the number of micro-batches. The rest are waited on at the end of the
step. Each message kind and destination chunk has its own tag, so Gloo matches receives to sends
regardless of the order in which two ranks post them.

NCCL ignores tags and matches in posting order. Every channel (sender → receiver) carries one
stream posted in the same order on both sides, except interleaved schedules at pp = 2, where one
channel carries activations and gradients; that case is verified on Gloo only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ACT, GRAD, META = 0, 1, 2
_META_LEN = 8  # ndim, up to 6 sizes, dtype code
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)


def tag(kind: int, chunk: int) -> int:
    """Message tag: one stream per (kind, destination chunk)."""
    return 3 * chunk + kind


@dataclass
class Pending:
    """A posted receive: its buffer and the works to wait on."""

    tensor: torch.Tensor
    works: list = field(default_factory=list)

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        self.works = []
        return self.tensor


@dataclass
class Sent:
    """A posted send: its buffer, kept alive until the send completes, and where it is consumed."""

    tensor: torch.Tensor
    works: list
    dst: int              # pp index of the receiver
    consumed_at: int | None  # index in dst's action list of the action that consumes it, if known
    shared: bool = False  # its works cover the whole batch (a coalescing backend such as NCCL)


class PipeComm:
    """Batched isend/irecv to other ranks of one pipeline group (peers given as pp indices)."""

    def __init__(self, group: "dist.ProcessGroup | None", ranks: list[int]):
        self.group = group
        self.ranks = ranks  # global rank of each pp index
        self._sends: list[Sent] = []

    @property
    def in_flight(self) -> int:
        """Sends posted and not yet waited on (their buffers are still held)."""
        return len(self._sends)

    def post(self, sends: list[tuple[torch.Tensor, int, int, int | None]],
             recvs: list[tuple[torch.Tensor, int, int]]) -> list[Pending]:
        """Post sends and receives as one batch.

        A send is (tensor, dst pp index, tag, index in dst's actions of the action consuming it,
        or None: kept until :meth:`wait_sends`); a receive is (buffer, src pp index, tag).
        """
        if not sends and not recvs:
            return []
        ops = [dist.P2POp(dist.isend, t, peer=self.ranks[dst], group=self.group, tag=tg)
               for t, dst, tg, _ in sends]
        ops += [dist.P2POp(dist.irecv, t, peer=self.ranks[src], group=self.group, tag=tg)
                for t, src, tg in recvs]
        works = dist.batch_isend_irecv(ops)
        # One work per op; a backend that coalesces the batch returns fewer: then wait on all.
        per_op = [[w] for w in works] if len(works) == len(ops) else [list(works)] * len(ops)
        shared = len(works) != len(ops)
        for (t, dst, _, at), w in zip(sends, per_op):
            self._sends.append(Sent(t, w, dst, at, shared))
        return [Pending(t, w) for (t, _, _), w in zip(recvs, per_op[len(sends):])]

    def release(self, peer: int, done: int) -> None:
        """Drop the sends to `peer` consumed by its actions 0..`done`, which it has finished.

        Their data has arrived, so waiting returns at once; waiting (rather than polling) is what
        marks a Gloo send complete and surfaces a failed one. A send whose works cover its whole
        batch is not waited on here (the batch may hold a receive of a later action, and NCCL
        would stall the compute stream on it); it is dropped once its works report completion.
        """
        keep = []
        for s in self._sends:
            if s.dst != peer or s.consumed_at is None or s.consumed_at > done:
                keep.append(s)
            elif not s.shared:
                for w in s.works:
                    w.wait()
            elif not all(w.is_completed() for w in s.works):
                keep.append(s)
        self._sends = keep

    def wait_sends(self) -> None:
        """Wait on every send still held (the end of a step)."""
        for s in self._sends:
            for w in s.works:
                w.wait()
        self._sends.clear()

    # --- shapes: sent once per (input shape, chunk), before the first activation ----------

    def send_meta(self, t: torch.Tensor, dst: int, chunk: int) -> None:
        if t.dim() > _META_LEN - 2 or t.dtype not in _DTYPES:
            raise ValueError(f"cannot pipeline an activation of shape {tuple(t.shape)} and dtype "
                             f"{t.dtype}: at most {_META_LEN - 2} dimensions of {_DTYPES}")
        meta = torch.zeros(_META_LEN, dtype=torch.int64)
        meta[0] = t.dim()
        meta[1:1 + t.dim()] = torch.tensor(t.shape)
        meta[-1] = _DTYPES.index(t.dtype)
        self.post([(meta.to(t.device), dst, tag(META, chunk), None)], [])

    def recv_meta(self, src: int, chunk: int, device: torch.device) -> tuple[torch.Size, torch.dtype]:
        meta = torch.zeros(_META_LEN, dtype=torch.int64, device=device)
        self.post([], [(meta, src, tag(META, chunk))])[0].wait()
        meta = meta.tolist()
        return torch.Size(meta[1:1 + meta[0]]), _DTYPES[meta[-1]]
