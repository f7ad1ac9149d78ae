"""Cutting one engine step into micro-batches that flow through the pipeline stages in turn.

Decoding rows (one token per sequence, in slot order) are cut into contiguous runs of slots, so
each micro-batch attends over one dense range of cache slots; prompt chunks are never cut (a
chunk's shape must depend on its own request alone, see :mod:`plait.serve.runner`) and each goes
to the micro-batch with the fewest tokens so far. A micro-batch holds at least `quantum` tokens
where it can: fewer would only add padding rows to every matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.serve.runner import StepInput


@dataclass
class MicroBatch:
    """Part of a step, and where its logits rows go among the step's logits."""

    step: StepInput
    order: list[int] = field(default_factory=list)  # step-level logits row of each of its logits rows


def split(step: StepInput, parts: int, quantum: int = 1) -> list[MicroBatch]:
    """`step` as at most `parts` micro-batches, in the order they enter the pipeline.

    The step's logits are its decoding rows first, then each chunk with `logits` set, in order
    (as :class:`~plait.serve.runner.ModelRunner` returns them); `order` maps each micro-batch's
    logits (laid out the same way) back to those rows.
    """
    nd = len(step.decode_tokens)
    items = nd + len(step.chunks)
    parts = max(1, min(parts, items, step.num_tokens // max(1, quantum)))
    mbs = [MicroBatch(StepInput()) for _ in range(parts)]
    # Decoding rows: contiguous, near-equal runs.
    bounds = [nd * i // parts for i in range(parts + 1)]
    for mb, a, b in zip(mbs, bounds, bounds[1:]):
        mb.step.decode_slots = step.decode_slots[a:b]
        mb.step.decode_tokens = step.decode_tokens[a:b]
        mb.step.decode_positions = step.decode_positions[a:b]
        mb.order = list(range(a, b))
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    row = nd
    for chunk in step.chunks:
        i = min(range(parts), key=lambda j: (sizes[j], j))
        mbs[i].step.chunks.append(chunk)
        sizes[i] += len(chunk.tokens)
        if chunk.logits:
            mbs[i].order.append(row)
            row += 1
    return [mb for mb in mbs if mb.step.num_tokens]
