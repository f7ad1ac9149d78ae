"""The message rank 0 broadcasts to every rank of a model-parallel group before each step.

Every rank needs the whole step (token ids, positions, cache slots, prompt chunks) to build its
micro-batches, and the cache moves the scheduler made since the last step (a finished sequence's
slot filled from the top one), which each rank applies to its own share of the KV cache. All of
it is integers, so it travels as one int64 tensor of a fixed size known to every rank: one
broadcast per step, no pickling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plait.serve.runner import Chunk, StepInput

STEP, MOVES, STOP = 1, 2, 3
_HEAD = 6  # op, decoding rows, chunks, chunk tokens, moves, micro-batches


@dataclass
class Message:
    op: int
    step: StepInput = field(default_factory=StepInput)
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, length)
    micro_batches: int = 1


def capacity(max_seqs: int, step_tokens: int) -> int:
    """int64 words of the largest message: a step of `max_seqs` rows and chunks, `step_tokens`
    chunk tokens, and one move per slot."""
    return _HEAD + 3 * max_seqs + 4 * max_seqs + step_tokens + 3 * max_seqs


def max_moves(max_seqs: int) -> int:
    return max_seqs


def encode(msg: Message, size: int) -> torch.Tensor:
    """`msg` as an int64 tensor of `size` words (zero padded)."""
    s = msg.step
    words = [msg.op, len(s.decode_tokens), len(s.chunks), sum(len(c.tokens) for c in s.chunks),
             len(msg.moves), msg.micro_batches]
    words += s.decode_slots + s.decode_tokens + s.decode_positions
    for c in s.chunks:
        words += [c.slot, c.start, len(c.tokens), int(c.logits)]
    for c in s.chunks:
        words += c.tokens
    for move in msg.moves:
        words += list(move)
    if len(words) > size:
        raise ValueError(f"step message of {len(words)} words exceeds the buffer of {size}")
    out = torch.zeros(size, dtype=torch.int64)
    out[:len(words)] = torch.tensor(words, dtype=torch.int64)
    return out


def decode(buf: torch.Tensor) -> Message:
    words = buf.tolist()
    op, nd, nc, nt, nm, mb = words[:_HEAD]
    at = _HEAD
    slots, tokens, positions = (words[at + i * nd: at + (i + 1) * nd] for i in range(3))
    at += 3 * nd
    heads = [words[at + 4 * i: at + 4 * i + 4] for i in range(nc)]
    at += 4 * nc
    chunks = []
    for slot, start, length, logits in heads:
        chunks.append(Chunk(slot, start, words[at:at + length], bool(logits)))
        at += length
    if at - _HEAD - 3 * nd - 4 * nc != nt:
        raise ValueError("corrupt step message: chunk token count does not add up")
    moves = [tuple(words[at + 3 * i: at + 3 * i + 3]) for i in range(nm)]
    return Message(op, StepInput(slots, tokens, positions, chunks), moves, mb)
