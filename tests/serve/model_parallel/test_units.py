"""The step message and the micro-batch split: pure functions, no processes."""

from __future__ import annotations

import pytest

from plait.serve.model_parallel import message
from plait.serve.model_parallel.microbatch import split
from plait.serve.runner import Chunk, StepInput


def mixed_step() -> StepInput:
    return StepInput(decode_slots=[0, 1, 2, 4, 5], decode_tokens=[7, 8, 9, 10, 11],
                     decode_positions=[30, 12, 50, 3, 9],
                     chunks=[Chunk(3, 16, list(range(16)), False), Chunk(6, 0, [1, 2, 3], True),
                             Chunk(7, 0, [4, 5], True)])


def test_message_round_trip():
    msg = message.Message(message.STEP, mixed_step(), moves=[(5, 1, 40), (4, 2, 7)], micro_batches=3)
    size = message.capacity(max_seqs=8, step_tokens=40)
    back = message.decode(message.encode(msg, size))
    assert back == msg
    stop = message.decode(message.encode(message.Message(message.STOP), size))
    assert stop.op == message.STOP and stop.step.num_tokens == 0 and stop.moves == []


def test_message_larger_than_the_buffer_is_refused():
    with pytest.raises(ValueError, match="exceeds the buffer"):
        message.encode(message.Message(message.STEP, mixed_step()), 10)


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_split_covers_the_step_and_maps_logits_back(parts):
    step = mixed_step()
    mbs = split(step, parts)
    assert 1 <= len(mbs) <= parts
    # Every decoding row and every chunk lands in exactly one micro-batch, in order.
    assert sum((mb.step.decode_slots for mb in mbs), []) == step.decode_slots
    assert sorted((c.slot for mb in mbs for c in mb.step.chunks)) == sorted(c.slot for c in step.chunks)
    for mb in mbs:
        slots = mb.step.decode_slots
        assert slots == sorted(slots)
        n_logits = len(slots) + sum(c.logits for c in mb.step.chunks)
        assert len(mb.order) == n_logits
    # Together the micro-batches' logits rows are the step's: decoders, then chunks with logits.
    order = sorted(j for mb in mbs for j in mb.order)
    assert order == list(range(len(step.decode_tokens) + 2))


def test_split_keeps_a_quantum_of_rows_per_micro_batch():
    step = StepInput(decode_slots=list(range(6)), decode_tokens=[1] * 6, decode_positions=[4] * 6)
    assert len(split(step, 4, quantum=4)) == 1  # 6 rows: a second micro-batch would be mostly padding
    assert len(split(step, 4, quantum=2)) == 3
    assert [len(mb.step.decode_slots) for mb in split(step, 2, quantum=1)] == [3, 3]
