"""One engine step on every rank of a model-parallel replica: micro-batches through the stages.

Stage s runs micro-batch i as soon as it has it, then hands its activations to stage s + 1 with
a non-blocking send and goes on to micro-batch i + 1, so with m micro-batches and p stages the
stages work at the same time except for the fill and drain of the pipeline: a step takes about
(m + p - 1) / (m·p) of a naive layer split's time, which pushes the whole batch through one
stage after the other (m = 1: what :func:`run_step` does with `micro_batches=1`). The last
stage's first tensor-parallel rank sends the step's logits to rank 0, which samples.

A sequence's step t + 1 cannot start before step t's logits are sampled, so within one step the
pipeline fills and drains; :mod:`plait.serve.model_parallel.cohorts` keeps the stages busy across
steps instead, with several groups of sequences in flight (:func:`start_step` starts a step on
rank 0 without waiting for the last stage).

Receives are posted up front in micro-batch order and sends in the same order on each channel,
with one tag per step and micro-batch (and one per step for its logits), so both Gloo (matching by
tag) and NCCL (matching by posting order) pair them right, also with steps in flight together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.serve.model_parallel.microbatch import split
from plait.serve.model_parallel.shard import StageShard
from plait.serve.runner import StepInput

_LOGITS_TAG = 1 << 20  # tags of logits messages start here; activations: step tag base + micro-batch index
_TAG_STEPS = 64  # steps told apart by tag (far more than are ever in flight at once)


@dataclass(frozen=True)
class Place:
    """Where a rank sits in a tp × pp replica: rank = stage · tp + tp_rank."""

    rank: int
    tp: int
    pp: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def peer(self, stage: int) -> int:
        """The rank of the same tp position on `stage`."""
        return stage * self.tp + self.tp_rank


def tags(index: int) -> tuple[int, int]:
    """(first activation tag, logits tag) of the `index`-th step a group runs: steps in flight at
    the same time (see :mod:`plait.serve.model_parallel.cohorts`) never share a tag."""
    k = index % _TAG_STEPS
    return k << 14, _LOGITS_TAG + k


def run_step(shard: StageShard, place: Place, step: StepInput, micro_batches: int,
             index: int = 0) -> torch.Tensor | None:
    """Run `step` (the group's `index`-th) here; rank 0 gets the step's logits (as the
    single-process runner returns them)."""
    return start_step(shard, place, step, micro_batches, index).finish()


@dataclass
class Pending:
    """A step this rank has started: its outstanding sends, and on rank 0 the logits to come."""

    shard: StageShard
    mbs: list
    sends: list  # (buffer, work): a send's buffer must live until it completes
    logits_in: tuple | None
    rank0: bool
    done: torch.Tensor | None = None

    def finish(self) -> torch.Tensor | None:
        """Wait for the step's messages; rank 0 gets the logits, in the step's row order."""
        for _, work in self.sends:
            work.wait()
        self.sends = []
        if not self.rank0:
            return None
        if self.done is not None:
            return self.done
        if self.logits_in is None:
            return torch.empty(0, self.shard.vocab_size, dtype=torch.float32, device=self.shard.device)
        self.logits_in[1].wait()
        return _order(self.shard, self.mbs, self.logits_in[0])


def start_step(shard: StageShard, place: Place, step: StepInput, micro_batches: int,
               index: int = 0) -> Pending:
    """Run this rank's part of `step` as far as it can without waiting for the next stage: on
    the first stage, its whole share (sends posted, not awaited); elsewhere, the whole step."""
    mbs = split(step, micro_batches, shard.quantum)
    rows = [shard.rows(mb.step) for mb in mbs]
    if place.pp == 1:
        outs = [shard.logits(shard.layers(shard.embed(r), r), r) for r in rows]
        done = _assemble(shard, step, mbs, outs) if place.rank == 0 else None
        return Pending(shard, mbs, [], None, place.rank == 0, done)

    tag0, logits_tag = tags(index)
    recvs = []
    if not place.first:
        src = place.peer(place.stage - 1)
        for i, r in enumerate(rows):
            buf = torch.empty(r.padded, shard.width, dtype=shard.dtype, device=shard.device)
            recvs.append((buf, dist.irecv(buf, src=src, tag=tag0 + i)))
    # The step's logits come back as one message when the last micro-batch is done: rank 0 has no
    # use for them earlier, and each message would wake it while it computes.
    n_logits = sum(len(r.logit_rows) for r in rows)
    sends = []  # (buffer, work): a send's buffer must live until it completes
    outs = []
    for i, r in enumerate(rows):
        if place.first:
            x = shard.embed(r)
        else:
            buf, work = recvs[i]
            work.wait()
            x = buf
        x = shard.layers(x, r)
        if place.last:
            outs.append(shard.logits(x, r))
        else:
            sends.append((x, dist.isend(x, dst=place.peer(place.stage + 1), tag=tag0 + i)))
    if place.last and place.tp_rank == 0 and n_logits:
        out = torch.cat(outs)
        sends.append((out, dist.isend(out, dst=0, tag=logits_tag)))
    logits_in = None
    if place.rank == 0 and n_logits:
        # Posted after this rank's sends: on NCCL, a receive queued ahead of them would block them.
        buf = torch.empty(n_logits, shard.vocab_size, dtype=torch.float32, device=shard.device)
        logits_in = (buf, dist.irecv(buf, src=place.pp * place.tp - place.tp, tag=logits_tag))
    if place.rank != 0:
        # Other ranks finish each step before reading the next message (their caches change in
        # message order).
        for _, work in sends:
            work.wait()
        sends = []
    return Pending(shard, mbs, sends, logits_in, place.rank == 0)


def _assemble(shard: StageShard, step: StepInput, mbs, outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else _order(shard, mbs, torch.cat(outs))


def _order(shard: StageShard, mbs, logits: torch.Tensor) -> torch.Tensor:
    """Micro-batches' logits, concatenated, back in the step's order (decoders, then chunks)."""
    if len(mbs) == 1 or not logits.size(0):
        return logits
    order = torch.tensor([j for mb in mbs for j in mb.order], device=shard.device, dtype=torch.long)
    return torch.empty_like(logits).index_copy_(0, order, logits)
