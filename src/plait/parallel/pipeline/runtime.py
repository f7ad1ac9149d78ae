"""Runs one rank's schedule: forward/backward of its chunks, transfers, loss, and bubble timing.

The runtime stashes each chunk's (input, output) from its forward until its backward; the number
stashed at once is the activation memory the schedule needs (GPipe: m, 1F1B: at most p).
Timing splits the step into compute (forward, loss, backward) and waiting (blocked on a receive
or on the final sends); the step's idle share, measured against the whole pipelined step, is its
bubble (see PipelineParallelModel.step_metrics). Timings are host clock times, exact on the CPU
(on CUDA they would need events; not done here).
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
        self._plans: dict[tuple[int, bool], list[Action]] = {}
        self._in_shapes: dict[tuple, tuple[torch.Size, torch.dtype]] = {}  # (key, chunk) -> received input
        self._out_shapes: dict[tuple, tuple[torch.Size, torch.dtype]] = {}  # (key, chunk) -> output
        self._meta_sent: set[tuple] = set()

    def plan(self, microbatches: int, train: bool = True) -> list[Action]:
        """This rank's actions for a step of `microbatches` (forwards only when not training)."""
        k = (microbatches, train)
        if k not in self._plans:
            if train:
                self._plans[k] = build_schedule(self.schedule, self.partition.stages, microbatches,
                                                self.partition.virtual_stages, self.rank)
            else:
                mine = self.partition.chunks_of(self.rank)
                self._plans[k] = [Action("F", g, mb) for mb in range(microbatches) for g in mine]
        return self._plans[k]

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
        stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        posted: dict[tuple[int, int, int], Pending] = {}
        sends: list[tuple[torch.Tensor, int, int]] = []
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
                t0 = time.perf_counter()
                inbound = self._inbound(a, key, posted)
                t1 = time.perf_counter()
                stats.wait_s += t1 - t0
                if a.kind == "F":
                    sends += self._forward(a, micro_batches, inbound, key, stash, loss_sum, autocast, train)
                else:
                    ctx = contextlib.nullcontext() if i == last_backward else no_sync()
                    with ctx:
                        sends += self._backward(a, m, inbound, stash)
                stats.durations.append(time.perf_counter() - t1)
                stats.compute_s += stats.durations[-1]
                stats.peak_stashed = max(stats.peak_stashed, len(stash))
            self.comm.post(sends, [])
            t0 = time.perf_counter()
            self.comm.wait_sends()
            stats.wait_s += time.perf_counter() - t0
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

    def _inbound(self, a: Action, key: tuple, posted: dict) -> torch.Tensor | None:
        """Wait for the activation (F) or output gradient (B) action `a` consumes."""
        kind = ACT if a.kind == "F" else GRAD
        if (a.kind == "F" and a.chunk == 0) or (a.kind == "B" and a.chunk == self.last_chunk):
            return None
        ident = (kind, a.chunk, a.mb)
        if ident not in posted:  # shape unknown until now: learn it, then receive
            src = self.partition.rank_of(a.chunk - 1 if kind == ACT else a.chunk + 1)
            if kind == ACT:
                self._in_shapes[(key, a.chunk)] = self.comm.recv_meta(src, a.chunk, self.device)
            r = self._recv_for(a, key)
            posted[ident] = self.comm.post([], [r[1:]])[0]
        return posted.pop(ident).wait()

    # --- compute ------------------------------------------------------------------------------

    def _forward(self, a: Action, micro_batches, inbound, key, stash, loss_sum, autocast,
                 train: bool) -> list[tuple[torch.Tensor, int, int]]:
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
        return [(out.detach().contiguous(), dst, tag(ACT, a.chunk + 1))]

    def _backward(self, a: Action, m: int, inbound, stash) -> list[tuple[torch.Tensor, int, int]]:
        inp, out = stash.pop((a.chunk, a.mb))
        if a.chunk == self.last_chunk:
            (out / m).backward()
        else:
            torch.autograd.backward(out, grad_tensors=inbound)
        if a.chunk == 0:
            return []
        return [(inp.grad, self.partition.rank_of(a.chunk - 1), tag(GRAD, a.chunk - 1))]
