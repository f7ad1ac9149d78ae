"""The messages between workers and servers: a small header, then a flat payload if any.

Every request a worker sends gets exactly one reply, so no message is ever left unread (a Gloo
send completes only once the peer receives it). Servers receive headers from *any* source
(Gloo's recv-from-any): a worker that dies simply stops sending, and the live ones are served
on; a send to a dead worker fails at once ("connection closed"). Payload sizes are fixed by the shard, so a payload is
read from the sender named by its header. Deliberately, no receive ever uses a timeout: a Gloo
receive that times out closes its connections, so liveness is judged from the arrival times of
messages instead (see :mod:`plait.parallel.parameter_server.server`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

# Tags keep the four streams apart on every worker–server pair.
TAG_REQUEST, TAG_REQUEST_DATA, TAG_REPLY, TAG_REPLY_DATA = 7101, 7102, 7103, 7104
HEADER_LEN = 5


class Kind(enum.IntEnum):
    """What a message means. Workers send 1–4; servers answer with 10–14."""

    HELLO = 1     # a worker starts: send me the parameters and where to resume
    PUSH = 2      # a gradient follows (payload)
    POLL = 3      # ssp: may I start my next step now?
    DONE = 4      # I have finished all my steps
    PARAMS = 10   # go on; the shard's parameters follow (payload)
    WAIT = 11     # ssp: you are too far ahead of the slowest worker; poll again
    LINGER = 12   # others still train; ask again
    RELEASE = 13  # the job is over; the final parameters follow (payload)
    STOP = 14     # you were declared dead (silent too long); stop


CARRIES_PAYLOAD = frozenset({Kind.PUSH, Kind.PARAMS, Kind.RELEASE})


@dataclass
class Header:
    """kind; the worker's step (its clock); the shard version the gradient was computed from (or
    the shard's version in a reply); and, in replies, the staleness of the pushed gradient and how
    many steps the worker is ahead of the slowest live worker."""

    kind: Kind
    step: int = 0
    version: int = 0
    staleness: int = 0
    ahead: int = 0

    def to_tensor(self) -> torch.Tensor:
        # float64 holds integers exactly up to 2**53: ample for steps and versions.
        return torch.tensor([self.kind, self.step, self.version, self.staleness, self.ahead],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        kind, step, version, staleness, ahead = (int(v) for v in t.tolist())
        return cls(Kind(kind), step, version, staleness, ahead)


def header_buffer() -> torch.Tensor:
    return torch.empty(HEADER_LEN, dtype=torch.float64)


HEADER_BYTES = HEADER_LEN * 8


def isend(dst: int, header: Header, payload: torch.Tensor | None, request: bool) -> list["dist.Work"]:
    """Start sending a header (and its payload) to `dst`; wait on the returned works before the
    payload buffer changes."""
    tag, data_tag = (TAG_REQUEST, TAG_REQUEST_DATA) if request else (TAG_REPLY, TAG_REPLY_DATA)
    works = [dist.isend(header.to_tensor(), dst=dst, tag=tag)]
    if header.kind in CARRIES_PAYLOAD:
        if payload is None:
            raise ValueError(f"a {header.kind.name} message needs a payload")
        works.append(dist.isend(payload, dst=dst, tag=data_tag))
    return works


def send(dst: int, header: Header, payload: torch.Tensor | None, request: bool) -> None:
    for work in isend(dst, header, payload, request):
        work.wait()


def recv_request(buf: torch.Tensor) -> tuple[int, Header]:
    """Block until some worker's request header arrives; returns (sender rank, header)."""
    src = dist.recv(buf, src=None, tag=TAG_REQUEST)
    return src, Header.from_tensor(buf)


def recv_payload(src: int, out: torch.Tensor, request: bool) -> None:
    dist.recv(out, src=src, tag=TAG_REQUEST_DATA if request else TAG_REPLY_DATA)


def recv_reply(buf: torch.Tensor, payload_out: Callable[[int], torch.Tensor]) -> tuple[int, Header]:
    """A worker reads the next reply from whichever server answers first (a server never waits
    on a worker that is still waiting on another server); a payload lands in
    `payload_out(server)`. Returns (server rank, header)."""
    src = dist.recv(buf, src=None, tag=TAG_REPLY)
    header = Header.from_tensor(buf)
    if header.kind in CARRIES_PAYLOAD:
        recv_payload(src, payload_out(src), request=False)
    return src, header
