"""Checks, at engine start, of the shapes under which this machine's arithmetic gives a request
the same bits whatever else is in the batch.

Rows. 
CPU GEMM libraries pick kernels (and thread splits of the reduction) by problem size: measured on
an x86 CPU with torch 2.13, `F.linear` on 1-3 rows gives different bits from the same rows inside
a larger batch, and on 2 threads also 5-7, 9-11 rows; multiples of 4 rows (and every count from
12) agree. The engine pads the rows of each step to a multiple of a quantum, and checks at start
which quantum gives identical rows for this model's layer shapes on this machine.

Spans. Attention over a cache slot masks the positions a query may not see with -inf (weight
exactly 0). Attending over the first S positions instead of the whole slot gives the same bits
when S is a multiple of a quantum (measured here: 8, at one and two threads): the masked tail
then only adds exact zeros in the same lanes. The engine checks this per quantum at start and,
if it holds, attends only as far as the batch's sequences reach, rounded up to the quantum.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.serve.attention import attend, span

log = logging.getLogger(__name__)

CANDIDATES = (4, 8, 16, 32)
SPAN_CANDIDATES = (16, 32, 64)


def pad_rows(n: int, quantum: int) -> int:
    """`n` rounded up to a positive multiple of `quantum`."""
    return max(quantum, -(-n // quantum) * quantum)


@torch.no_grad()
def probe_row_quantum(model: nn.Module, max_rows: int, candidates: tuple[int, ...] = CANDIDATES) -> int:
    """The smallest quantum q for which, for every distinct linear-layer shape of `model`, the rows
    of a product over k·q rows equal the same rows of a product over more rows.

    Falls back to the largest candidate, with a warning, when none qualifies: outputs then stay
    deterministic per batch but may differ in the last bits between batch compositions.
    """
    shapes: dict[tuple[int, int], nn.Linear] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shapes.setdefault(tuple(m.weight.shape), m)
    gen = torch.Generator().manual_seed(0)
    for q in candidates:
        top = pad_rows(max(max_rows, 4 * q), q)
        counts = sorted({c for c in (q, 2 * q, 3 * q, 5 * q, 8 * q, top - q) if 0 < c < top})
        if all(_rows_agree(layer, top, counts, gen) for layer in shapes.values()):
            log.info("row quantum %d: rows of a batched product match at this machine's GEMM", q)
            return q
    log.warning("no row quantum in %s gives batch-invariant matrix products on this machine; "
                "batched outputs may differ in the last bits from one-at-a-time ones", candidates)
    return candidates[-1]


def _rows_agree(layer: nn.Linear, top: int, counts: list[int], gen: torch.Generator) -> bool:
    w, b = layer.weight, layer.bias
    x = torch.randn(top, w.shape[1], generator=gen).to(dtype=w.dtype, device=w.device)
    ref = F.linear(x, w, b)
    return all(torch.equal(F.linear(x[:n], w, b), ref[:n]) for n in counts)


@torch.no_grad()
def probe_span_quantum(n_head: int, head_dim: int, length: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", candidates: tuple[int, ...] = SPAN_CANDIDATES) -> int:
    """The smallest quantum q for which attention over the first multiple-of-q positions that
    covers a query equals attention over the whole slot of `length`, for decoding queries (in
    batches of 1 and 5) and for a prompt chunk; `length` (whole slots) when none does."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    where = torch.arange(length, device=device)
    causal = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(
        where[None, :] > where[:, None], float("-inf"))
    for q in (c for c in candidates if c < length):
        ok = True
        for batch in (1, 5):
            qs, kt, v = rand(batch, n_head, 1, head_dim), rand(batch, n_head, head_dim, length), \
                rand(batch, n_head, length, head_dim)
            pos = torch.randint(0, length, (batch,), generator=gen).to(device)
            bias = torch.zeros(batch, length, dtype=dtype, device=device).masked_fill(
                where[None, :] > pos[:, None], float("-inf"))[:, None, None, :]
            whole = attend(qs, kt, v, bias, 0.125)
            reach = span(int(pos.max()), q, length)
            for s in sorted({reach, span(reach, q, length), length}):
                ok &= torch.equal(attend(qs, kt[..., :s], v[:, :, :s], bias[..., :s], 0.125), whole)
        chunk, start = min(length // 2, 40), length // 4
        qc = rand(1, n_head, chunk, head_dim)
        whole = attend(qc, kt[:1], v[:1], causal[start:start + chunk], 0.125)
        s = span(start + chunk - 1, q, length)
        ok &= torch.equal(attend(qc, kt[:1, ..., :s], v[:1, :, :s], causal[start:start + chunk, :s], 0.125), whole)
        if ok:
            log.info("span quantum %d: attention over a rounded-up span matches the whole slot", q)
            return q
    log.info("no span quantum in %s matches attention over whole slots here: attending over whole slots",
             candidates)
    return length
