"""Point-to-point activation and gradient transfers between pipeline ranks, batched.

Every action boundary posts one `dist.batch_isend_irecv` holding the sends the previous action
produced and the receives the next actions need. Sends are never waited on until the end of the
step, so a rank only ever blocks on a receive whose data the schedule's order guarantees the peer
will send: no schedule that respects its data dependencies can deadlock. Each message kind and
destination chunk has its own tag, so Gloo matches receives to sends regardless of the order in
which two ranks post them.

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


class PipeComm:
    """Batched isend/irecv to other ranks of one pipeline group (peers given as pp indices)."""

    def __init__(self, group: "dist.ProcessGroup | None", ranks: list[int]):
        self.group = group
        self.ranks = ranks  # global rank of each pp index
        self._sends: list[tuple[list, torch.Tensor]] = []

    def post(self, sends: list[tuple[torch.Tensor, int, int]],
             recvs: list[tuple[torch.Tensor, int, int]]) -> list[Pending]:
        """Post sends (tensor, dst pp index, tag) and receives (buffer, src, tag) as one batch."""
        if not sends and not recvs:
            return []
        ops = [dist.P2POp(dist.isend, t, peer=self.ranks[dst], group=self.group, tag=tg)
               for t, dst, tg in sends]
        ops += [dist.P2POp(dist.irecv, t, peer=self.ranks[src], group=self.group, tag=tg)
                for t, src, tg in recvs]
        works = dist.batch_isend_irecv(ops)
        # One work per op; a backend that coalesces the batch returns fewer: then wait on all.
        per_op = [[w] for w in works] if len(works) == len(ops) else [list(works)] * len(ops)
        for (t, _, _), w in zip(sends, per_op):
            self._sends.append((w, t))  # keeps the tensor alive until it is sent
        return [Pending(t, w) for (t, _, _), w in zip(recvs, per_op[len(sends):])]

    def wait_sends(self) -> None:
        for works, _ in self._sends:
            for w in works:
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
        self.post([(meta.to(t.device), dst, tag(META, chunk))], [])

    def recv_meta(self, src: int, chunk: int, device: torch.device) -> tuple[torch.Size, torch.dtype]:
        meta = torch.zeros(_META_LEN, dtype=torch.int64, device=device)
        self.post([], [(meta, src, tag(META, chunk))])[0].wait()
        meta = meta.tolist()
        return torch.Size(meta[1:1 + meta[0]]), _DTYPES[meta[-1]]
