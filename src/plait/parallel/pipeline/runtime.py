"""Runs one rank's schedule: forward/backward of its chunks, transfers, loss, and bubble timing.

The runtime stashes each chunk's (input, output) from its forward until its backward; the number
stashed at once is the activation memory the schedule needs (GPipe: m, 1F1B: at most p). A sent
activation or gradient is held until the receiver has consumed it: a message from a peer proves
that the peer finished every action before the one that sent it, so the sends those actions
consumed are released then (`PipeComm.release`), and sent buffers, like the stash, follow p, not m.

Timing splits the step into compute (forward, loss, backward) and waiting (blocked on a receive
or on the final sends); the step's idle share, measured against the whole pipelined step, is its
bubble (see PipelineParallelModel.step_metrics). On the CPU, ops run as they are called and the
host clock times them; on CUDA they run later on the device, so :class:`StepClock` records CUDA
events on the compute stream and reads them once, at the end of the step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from plait.parallel.pipeline.p2p import ACT, GRAD, Pending, PipeComm, tag
from plait.parallel.pipeline.partition import Partition
from plait.parallel.pipeline.schedules import Action, build_schedule

Batch = tuple[torch.Tensor, torch.Tensor]

# Receives are posted for this action and the next two. Gloo stalls the posting rank for a few
# milliseconds when a receive is posted after its matching send has been issued (measured 2-4 ms
# for 256 KB on the CPU); two actions of lookahead posts every 1F1B and GPipe receive before its
# peer sends, at the cost of at most two extra receive buffers per rank.
LOOKAHEAD = 3


class StepClock:
    """Timestamps for one step: host clock on the CPU, CUDA events on the device's stream on CUDA.

    `mark()` costs no host synchronisation on either; `resolve()` (once, at the end of the step)
    waits for the last CUDA event and returns every mark's time in seconds since the first.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> int:
        """Record now (on CUDA: when the stream reaches this point); returns the mark's index."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        return len(self._marks) - 1

    def resolve(self) -> list[float]:
        """Seconds from the first mark to each mark (one device synchronisation on CUDA)."""
        if not self._marks:
            return []
        first = self._marks[0]
        if self.cuda:
            self._marks[-1].synchronize()
            return [first.elapsed_time(e) / 1e3 for e in self._marks]  # elapsed_time is in ms
        return [t - first for t in self._marks]


@dataclass
class StepStats:
    """One rank's account of one pipeline step."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    peak_stashed: int = 0   # most (chunk, micro-batch) activations held at once
    microbatches: int = 0
    durations: list[float] = field(default_factory=list)  # compute seconds of each action, in plan order


class PipelineRuntime:
    """Executes `schedule` for pipeline rank `rank` over its chunks (global chunk id -> module)."""

    def __init__(self, chunks: dict[int, nn.Module], partition: Partition, rank: int, comm: PipeComm,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: str,
                 device: torch.device):
        self.chunks = chunks
        self.partition = partition
        self.rank = rank
        self.comm = comm
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.device = device
        self.last_chunk = partition.num_chunks - 1
        self._plans: dict[tuple[int, int, bool], list[Action]] = {}  # (rank, m, train) -> actions
        self._index: dict[tuple[int, int, bool], dict[Action, int]] = {}  # position in that list
        self._in_shapes: dict[tuple, tuple[torch.Size, torch.dtype]] = {}  # (key, chunk) -> received input
        self._out_shapes: dict[tuple, tuple[torch.Size, torch.dtype]] = {}  # (key, chunk) -> output
        self._meta_sent: set[tuple] = set()

    def plan(self, microbatches: int, train: bool = True, rank: int | None = None) -> list[Action]:
        """A rank's actions (this rank's by default) for a step of `microbatches` (forwards only
        when not training)."""
        rank = self.rank if rank is None else rank
        k = (rank, microbatches, train)
        if k not in self._plans:
            if train:
                self._plans[k] = build_schedule(self.schedule, self.partition.stages, microbatches,
                                                self.partition.virtual_stages, rank)
            else:
                chunks = self.partition.chunks_of(rank)
                self._plans[k] = [Action("F", g, mb) for mb in range(microbatches) for g in chunks]
            self._index[k] = {a: i for i, a in enumerate(self._plans[k])}
        return self._plans[k]

    def _position(self, rank: int, action: Action, microbatches: int, train: bool) -> int:
        """Where `action` stands in `rank`'s actions for this step."""
        self.plan(microbatches, train, rank)
        return self._index[(rank, microbatches, train)][action]

    def run(self, micro_batches: Sequence[Batch], autocast: Callable[[], ContextManager],
            no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
            train: bool = True) -> tuple[torch.Tensor | None, StepStats]:
        """One step; returns (sum of micro-batch losses on the last stage, else None; stats).

        Gradients are those of the mean loss over micro-batches. Every backward but this rank's
        last runs under `no_sync`, so data-parallel reduction happens once, at the end.
        """
        m = len(micro_batches)
        actions = self.plan(m, train)
        with autocast():
            amp = (torch.is_autocast_enabled(self.device.type),
                   torch.get_autocast_dtype(self.device.type))
        key = (tuple(micro_batches[0][0].shape), amp)
        stats = StepStats(microbatches=m)
        clock = StepClock(self.device)
        marks: list[tuple[int, int, int]] = []  # per action: waiting from, computing from, done
        stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        posted: dict[tuple[int, int, int], Pending] = {}
        sends: list[tuple[torch.Tensor, int, int, int]] = []
        loss_sum = torch.zeros((), device=self.device) if self.rank == self.partition.rank_of(self.last_chunk) else None
        last_backward = max((i for i, a in enumerate(actions) if a.kind == "B"), default=-1)
        grad_ctx = contextlib.nullcontext if train else torch.no_grad
        with grad_ctx():
            for i, a in enumerate(actions):
                recvs = []
                for b in actions[i:i + LOOKAHEAD]:  # this action's input, and the next ones'
                    r = self._recv_for(b, key)
                    if r is not None and r[0] not in posted:
                        recvs.append(r)
                pending = self.comm.post(sends, [(buf, src, tg) for _, buf, src, tg in recvs])
                sends = []
                posted.update({r[0]: p for r, p in zip(recvs, pending)})
                waiting = clock.mark()
                inbound = self._inbound(a, key, posted, m, train)
                computing = clock.mark()
                if a.kind == "F":
                    sends += self._forward(a, micro_batches, inbound, key, stash, loss_sum, autocast, train)
                else:
                    ctx = contextlib.nullcontext() if i == last_backward else no_sync()
                    with ctx:
                        sends += self._backward(a, m, inbound, stash)
                marks.append((waiting, computing, clock.mark()))
                stats.peak_stashed = max(stats.peak_stashed, len(stash))
            self.comm.post(sends, [])
            waiting = clock.mark()
            self.comm.wait_sends()
            done = clock.mark()
        t = clock.resolve()
        stats.durations = [t[c1] - t[c0] for _, c0, c1 in marks]
        stats.compute_s = sum(stats.durations)
        stats.wait_s = sum(t[c0] - t[w0] for w0, c0, _ in marks) + t[done] - t[waiting]
        return loss_sum, stats

    # --- transfers ----------------------------------------------------------------------------

    def _recv_for(self, a: Action, key: tuple) -> tuple[tuple[int, int, int], torch.Tensor, int, int] | None:
        """The receive action `a` needs, if any and if its shape is known: (id, buffer, src, tag)."""
        if a.kind == "F" and a.chunk > 0:
            shape = self._in_shapes.get((key, a.chunk))
            kind, src = ACT, self.partition.rank_of(a.chunk - 1)
        elif a.kind == "B" and a.chunk < self.last_chunk:
            shape = self._out_shapes.get((key, a.chunk))
            kind, src = GRAD, self.partition.rank_of(a.chunk + 1)
        else:
            return None
        if shape is None:
            return None  # first step with this input shape: the shape arrives with the data
        buf = torch.empty(shape[0], dtype=shape[1], device=self.device)
        return (kind, a.chunk, a.mb), buf, src, tag(kind, a.chunk)

    def _inbound(self, a: Action, key: tuple, posted: dict, m: int, train: bool) -> torch.Tensor | None:
        """Wait for the activation (F) or output gradient (B) action `a` consumes; then release
        the sends its sender has consumed."""
        kind = ACT if a.kind == "F" else GRAD
        if (a.kind == "F" and a.chunk == 0) or (a.kind == "B" and a.chunk == self.last_chunk):
            return None
        ident = (kind, a.chunk, a.mb)
        producer = Action(a.kind, a.chunk - 1 if kind == ACT else a.chunk + 1, a.mb)
        src = self.partition.rank_of(producer.chunk)
        if ident not in posted:  # shape unknown until now: learn it, then receive
            if kind == ACT:
                self._in_shapes[(key, a.chunk)] = self.comm.recv_meta(src, a.chunk, self.device)
            r = self._recv_for(a, key)
            posted[ident] = self.comm.post([], [r[1:]])[0]
        inbound = posted.pop(ident).wait()
        # The sender posts this message after finishing `producer`, so it has received everything
        # its actions up to `producer` consume.
        self.comm.release(src, self._position(src, producer, m, train))
        return inbound

    # --- compute ------------------------------------------------------------------------------

    def _forward(self, a: Action, micro_batches, inbound, key, stash, loss_sum, autocast,
                 train: bool) -> list[tuple[torch.Tensor, int, int, int]]:
        x, y = micro_batches[a.mb]
        inp = x if a.chunk == 0 else inbound.requires_grad_(train and inbound.is_floating_point())
        with autocast():
            out = self.chunks[a.chunk](inp)
            if a.chunk == self.last_chunk:
                out = self.loss_fn(out, y)
        if a.chunk == self.last_chunk:
            loss_sum += out.detach().float()
        if train:
            stash[(a.chunk, a.mb)] = (inp, out)
        if a.chunk == self.last_chunk:
            return []
        self._out_shapes[(key, a.chunk)] = (out.shape, out.dtype)
        dst = self.partition.rank_of(a.chunk + 1)
        if (key, a.chunk + 1) not in self._meta_sent:
            self.comm.send_meta(out, dst, a.chunk + 1)
            self._meta_sent.add((key, a.chunk + 1))
        at = self._position(dst, Action("F", a.chunk + 1, a.mb), len(micro_batches), train)
        return [(out.detach().contiguous(), dst, tag(ACT, a.chunk + 1), at)]

    def _backward(self, a: Action, m: int, inbound, stash) -> list[tuple[torch.Tensor, int, int, int]]:
        inp, out = stash.pop((a.chunk, a.mb))
        if a.chunk == self.last_chunk:
            (out / m).backward()
        else:
            torch.autograd.backward(out, grad_tensors=inbound)
        if a.chunk == 0:
            return []
        dst = self.partition.rank_of(a.chunk - 1)
        at = self._position(dst, Action("B", a.chunk - 1, a.mb), m, True)
        return [(inp.grad, dst, tag(GRAD, a.chunk - 1), at)]
