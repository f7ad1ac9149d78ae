"""One engine step through the model: ragged rows in, the logits that pick the next tokens out.

A step mixes sequences that decode (one token each) with prompt chunks being prefilled. Their
tokens are laid out as rows of one matrix, so every linear layer runs once per step for all of
them, and each token's keys and values go into its sequence's cache slot.

The rule that makes a request's output independent of its batch: every floating-point result a
request sees comes from arithmetic (shapes seen by its rows, reduction orders) that does not
depend on the other requests.

* Linear layers, norms and GELU work row by row; the row count is padded to a quantum checked
  at start (:mod:`plait.serve.invariance`), which keeps the GEMM's per-row arithmetic fixed.
* Attention is written out as matmul / softmax / matmul over the whole fixed-length cache slot
  (masked positions get -inf, hence weight exactly 0), never over "the longest sequence in the
  batch". torch's fused CPU attention is avoided on purpose: on two threads its results for one
  sequence change with the batch size (it splits work across sequences and positions by size).
  Attention reads a slot only as far as the batch's sequences reach, rounded up to a span
  quantum checked at start to give the same bits as the whole slot (see
  :mod:`plait.serve.invariance`); without one it reads whole slots.
* A prompt is cut into chunks at fixed multiples of the chunk size, so a chunk's shape depends
  only on its own request, never on how much budget other requests left in that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.models.gpt import GPT
from plait.serve.activation import gelu_tanh
from plait.serve.attention import attend, span
from plait.serve.invariance import pad_rows
from plait.serve.kv_cache import KVCache


@dataclass
class Chunk:
    """Prompt tokens [start, start + len(tokens)) of the sequence in `slot`."""

    slot: int
    start: int
    tokens: list[int]
    logits: bool  # the prompt's last chunk: its last row's logits choose the first new token


@dataclass
class StepInput:
    decode_slots: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode_tokens) + sum(len(c.tokens) for c in self.chunks)

    def rows(self) -> tuple[list[int], list[int], list[int]]:
        """The step's token ids, positions and cache slots, one per row: decoders, then chunks."""
        ids, pos, slots = list(self.decode_tokens), list(self.decode_positions), list(self.decode_slots)
        for ch in self.chunks:
            ids += ch.tokens
            pos += range(ch.start, ch.start + len(ch.tokens))
            slots += [ch.slot] * len(ch.tokens)
        return ids, pos, slots


def cache_geometry(n_head: int, head_dim: int, block_size: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions 0…L−1; the causal mask (causal[i, j] = 0 where position j may be seen from i,
    else −inf); the offsets of one token's keys and of its values (head, dim) in a layer's
    flattened cache slot, for index_copy_."""
    L = block_size
    pos = torch.arange(L, device=device)
    causal = torch.zeros(L, L, dtype=dtype, device=device).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    grid_h, grid_d = torch.arange(n_head, device=device)[:, None], torch.arange(head_dim, device=device)[None, :]
    k_offsets = ((grid_h * head_dim + grid_d) * L).reshape(-1)
    v_offsets = (grid_h * L * head_dim + grid_d).reshape(-1)
    return pos, causal, k_offsets, v_offsets


class StepRunner(Protocol):
    """What the engine needs of whatever runs its steps: the KV cache whose slots the scheduler
    hands out (allocate, release, move), the row and span quanta it pads to, and the step itself."""

    cache: KVCache
    quantum: int
    span_quantum: int

    def forward(self, step: StepInput) -> torch.Tensor: ...


class ModelRunner:
    """Runs a plain :class:`GPT`'s layers over a step's rows, with the KV cache.

    The layers are called as the functions their modules call (layer_norm, linear, tanh GELU) on
    the modules' own parameter tensors, bound once: a step runs a few hundred small operations,
    and skipping nn.Module dispatch for each is a measurable part of a step on a small model. The
    GELU is :func:`plait.serve.activation.gelu_tanh`, the same function computed faster.
    """

    def __init__(self, model: GPT, cache: KVCache, row_quantum: int, span_quantum: int):
        self.model = model
        self.cache = cache
        self.quantum = row_quantum
        self.span_quantum = span_quantum
        c = model.cfg
        self.n_head, self.head_dim, self.width = c.n_head, c.n_embd // c.n_head, c.n_embd
        self.scale = 1.0 / math.sqrt(self.head_dim)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.layers = [_Layer(b) for b in model.blocks]
        self.ln_f = (model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
        self.positions, self.causal, self.k_offsets, self.v_offsets = cache_geometry(
            self.n_head, self.head_dim, cache.block_size, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits (float32) for each decoding sequence, then for each chunk with `logits` set."""
        m, dev = self.model, self.device
        H, D, C, L = self.n_head, self.head_dim, self.width, self.cache.block_size
        nd = len(step.decode_tokens)
        ids, pos, slots = step.rows()
        n = len(ids)
        padded = pad_rows(n, self.quantum)
        # Padding rows are real embeddings (token 0 at position 0); their keys are never stored.
        ids_t = torch.tensor(ids + [0] * (padded - n), device=dev)
        pos_t = torch.tensor(pos + [0] * (padded - n), device=dev)
        slot_t = torch.tensor(slots, device=dev)
        x = m.tok_emb(ids_t) + m.pos_emb(pos_t)
        # Where each token's keys and values go in a layer's flattened cache slots.
        k_index = ((slot_t * (H * D * L) + pos_t[:n])[:, None] + self.k_offsets).reshape(-1)
        v_index = ((slot_t * (H * L * D) + pos_t[:n] * D)[:, None] + self.v_offsets).reshape(-1)

        if nd:
            # Decoding sequences attend from their cache slots: slots [0, hi) are computed together
            # (each slot one item of a batched matmul), each masked past its own position.
            hi = max(step.decode_slots) + 1
            reach = span(max(step.decode_positions), self.span_quantum, L)
            dense = step.decode_slots == list(range(hi))
            dslot = slot_t[:nd]
            seen = torch.zeros(hi, device=dev, dtype=torch.long)  # idle slots: position 0 only
            seen.index_copy_(0, dslot, pos_t[:nd])
            dbias = torch.zeros(hi, reach, dtype=self.dtype, device=dev).masked_fill_(
                self.positions[None, :reach] > seen[:, None], float("-inf"))[:, None, None, :]
        y = x.new_zeros(padded, C)

        for layer, kc, vc in zip(self.layers, self.cache.k, self.cache.v):
            qkv = layer.qkv(layer.ln1(x))[:n].view(n, 3, H, D)
            q, k, v = qkv.unbind(1)
            kc.view(-1).index_copy_(0, k_index, k.reshape(-1))
            vc.view(-1).index_copy_(0, v_index, v.reshape(-1))
            if nd:
                qd = q[:nd].unsqueeze(2)
                if not dense:
                    qd = x.new_zeros(hi, H, 1, D).index_copy_(0, dslot, qd)
                att = attend(qd, kc[:hi, :, :, :reach], vc[:hi, :, :reach], dbias, self.scale)
                y[:nd] = (att if dense else att.index_select(0, dslot)).view(nd, C)
            row = nd
            for ch in step.chunks:
                c = len(ch.tokens)
                qc = q[row:row + c].transpose(0, 1).unsqueeze(0)  # (1, H, c, D)
                s = span(ch.start + c - 1, self.span_quantum, L)
                att = attend(qc, kc[ch.slot:ch.slot + 1, :, :, :s], vc[ch.slot:ch.slot + 1, :, :s],
                             self.causal[ch.start:ch.start + c, :s], self.scale)
                y[row:row + c] = att[0].transpose(0, 1).reshape(c, C)
                row += c
            x = x + layer.proj(y)
            x = x + layer.mlp(layer.ln2(x))

        rows = list(range(nd))
        row = nd
        for ch in step.chunks:
            row += len(ch.tokens)
            if ch.logits:
                rows.append(row - 1)
        if not rows:
            return torch.empty(0, m.cfg.vocab_size, device=dev)
        xs = x[torch.tensor(rows + [0] * (pad_rows(len(rows), self.quantum) - len(rows)), device=dev)]
        return F.linear(F.layer_norm(xs, (C,), *self.ln_f), m.head.weight)[:len(rows)].float()


class _Layer:
    """One block's parameters, bound to the functions its modules would call."""

    def __init__(self, block: nn.Module):
        a, mlp = block.attn, block.mlp
        self._ln1 = (block.ln1.normalized_shape, block.ln1.weight, block.ln1.bias, block.ln1.eps)
        self._ln2 = (block.ln2.normalized_shape, block.ln2.weight, block.ln2.bias, block.ln2.eps)
        self._qkv = (a.qkv.weight, a.qkv.bias)
        self._proj = (a.proj.weight, a.proj.bias)
        self._fc = (mlp.fc.weight, mlp.fc.bias)
        self._mproj = (mlp.proj.weight, mlp.proj.bias)

    def ln1(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, *self._ln1)

    def ln2(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, *self._ln2)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._qkv)

    def proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._proj)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(gelu_tanh(F.linear(x, *self._fc)), *self._mproj)
