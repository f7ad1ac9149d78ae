"""One engine step on every rank of a model-parallel replica: micro-batches through the stages.

Stage s runs micro-batch i as soon as it has it, then hands its activations to stage s + 1 with
a non-blocking send and goes on to micro-batch i + 1, so with m micro-batches and p stages the
stages work at the same time except for the fill and drain of the pipeline: a step takes about
(m + p - 1) / (m·p) of a naive layer split's time, which pushes the whole batch through one
stage after the other (m = 1: what :func:`run_step` does with `micro_batches=1`). The last
stage's first tensor-parallel rank sends the step's logits to rank 0, which samples.

Decoding cannot pipeline across steps (step t + 1's tokens are sampled from step t's logits), so
the pipeline fills and drains within every step.

Receives are posted up front in micro-batch order and sends in the same order on each channel,
with one tag per micro-batch (and one for the step's logits), so both Gloo (matching by tag) and
NCCL (matching by posting order) pair them right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.serve.model_parallel.microbatch import split
from plait.serve.model_parallel.shard import StageShard
from plait.serve.runner import StepInput

_LOGITS_TAG = 1 << 20  # tags of logits messages start here; activations use the micro-batch index


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


def run_step(shard: StageShard, place: Place, step: StepInput, micro_batches: int) -> torch.Tensor | None:
    """Run `step` here; rank 0 gets the step's logits (as the single-process runner returns them)."""
    mbs = split(step, micro_batches, shard.quantum)
    rows = [shard.rows(mb.step) for mb in mbs]
    if place.pp == 1:
        outs = [shard.logits(shard.layers(shard.embed(r), r), r) for r in rows]
        return _assemble(shard, step, mbs, outs) if place.rank == 0 else None

    recvs = []
    if not place.first:
        src = place.peer(place.stage - 1)
        for i, r in enumerate(rows):
            buf = torch.empty(r.padded, shard.width, dtype=shard.dtype, device=shard.device)
            recvs.append((buf, dist.irecv(buf, src=src, tag=i)))
    # The step's logits come back as one message when the last micro-batch is done: rank 0 has no
    # use for them earlier, and each message would wake it while it computes.
    n_logits = sum(len(r.logit_rows) for r in rows)
    logits_in = None
    if place.rank == 0 and n_logits:
        buf = torch.empty(n_logits, shard.vocab_size, dtype=torch.float32, device=shard.device)
        logits_in = (buf, dist.irecv(buf, src=place.pp * place.tp - place.tp, tag=_LOGITS_TAG))
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
            sends.append((x, dist.isend(x, dst=place.peer(place.stage + 1), tag=i)))
    if place.last and place.tp_rank == 0 and n_logits:
        out = torch.cat(outs)
        sends.append((out, dist.isend(out, dst=0, tag=_LOGITS_TAG)))
    for _, work in sends:
        work.wait()
    if place.rank != 0:
        return None
    if logits_in is None:
        return torch.empty(0, shard.vocab_size, dtype=torch.float32, device=shard.device)
    logits_in[1].wait()
    return _order(shard, mbs, logits_in[0])


def _assemble(shard: StageShard, step: StepInput, mbs, outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else _order(shard, mbs, torch.cat(outs))


def _order(shard: StageShard, mbs, logits: torch.Tensor) -> torch.Tensor:
    """Micro-batches' logits, concatenated, back in the step's order (decoders, then chunks)."""
    if len(mbs) == 1 or not logits.size(0):
        return logits
    order = torch.tensor([j for mb in mbs for j in mb.order], device=shard.device, dtype=torch.long)
    return torch.empty_like(logits).index_copy_(0, order, logits)
