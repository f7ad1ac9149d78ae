"""One rank's share of a model-parallel replica: its pipeline stage's layers, with their attention
heads and MLP split over the stage's tensor-parallel group, and the KV cache of those heads.

The arithmetic is the serving runner's (:mod:`plait.serve.runner`): rows padded to the row
quantum, attention written out over fixed-length cache slots. Only where the work lives changes:

* tensor parallel: the model's own plan (`GPT.plan()`, Megatron-LM's split from the training
  side) swaps in column-parallel qkv and MLP-in layers (no communication) and row-parallel
  projections (one all-reduce each); each rank attends over its own heads, from its own cache.
  The token embedding and the tied head split by vocabulary; the head's logits are gathered
  over the group before sampling.
* pipeline: a stage keeps blocks [lo, hi) and their cache; the first stage embeds, the last
  applies the final norm and head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from plait.models.gpt import GPT
from plait.parallel.tensor_parallel.ops import all_gather_dim
from plait.parallel.tensor_parallel.plan import apply_plan
from plait.serve.activation import gelu_tanh
from plait.serve.attention import attend, span
from plait.serve.invariance import pad_rows
from plait.serve.kv_cache import KVCache
from plait.serve.runner import StepInput, cache_geometry


@dataclass
class Rows:
    """A micro-batch laid out as rows, with the index tensors every layer of this rank needs."""

    step: StepInput
    n: int            # real rows
    padded: int       # rows after padding to the quantum
    ids: torch.Tensor
    pos: torch.Tensor
    k_index: torch.Tensor
    v_index: torch.Tensor
    logit_rows: list[int]
    # Decoding rows attend from slots [lo, hi) as one batched product.
    lo: int = 0
    hi: int = 0
    reach: int = 0
    dense: bool = True
    dslot: torch.Tensor | None = None  # slot - lo of each decoding row
    dbias: torch.Tensor | None = None


class StageShard:
    """Blocks [lo, hi) of `model` on this rank, split over `tp_group` (None: not split)."""

    def __init__(self, model: GPT, lo: int, hi: int, *, first: bool, last: bool, tp_group, max_seqs: int,
                 quantum: int, span_quantum: int):
        c = model.cfg
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_group = tp_group
        if self.tp > 1:
            apply_plan(model, GPT.plan(), tp_group)  # in place: this rank's shards replace the layers
        self.model = model
        self.first, self.last = first, last
        self.lo, self.hi = lo, hi
        self.vocab_size, self.width = c.vocab_size, c.n_embd
        self.n_head, self.head_dim = c.n_head // self.tp, c.n_embd // c.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.quantum, self.span_quantum = quantum, span_quantum
        p = model.ln_f.weight
        self.device, self.dtype = p.device, p.dtype
        self.blocks = [model.blocks[i] for i in range(lo, hi)]
        L = c.block_size
        self.cache = KVCache(hi - lo, max_seqs, self.n_head, L, self.head_dim, dtype=p.dtype, device=p.device)
        self.positions, self.causal, self.k_offsets, self.v_offsets = cache_geometry(
            self.n_head, self.head_dim, L, self.dtype, self.device)

    # --- layout -------------------------------------------------------------------------------

    def rows(self, step: StepInput) -> Rows:
        """Index tensors for `step`'s rows on this rank (every rank derives the same rows)."""
        dev, H, D, L = self.device, self.n_head, self.head_dim, self.cache.block_size
        nd = len(step.decode_tokens)
        ids, pos, slots = step.rows()
        n = len(ids)
        padded = pad_rows(n, self.quantum)
        # Padding rows are real embeddings (token 0 at position 0); their keys are never stored.
        ids_t = torch.tensor(ids + [0] * (padded - n), device=dev)
        pos_t = torch.tensor(pos + [0] * (padded - n), device=dev)
        slot_t = torch.tensor(slots, device=dev, dtype=torch.long)
        k_index = ((slot_t * (H * D * L) + pos_t[:n])[:, None] + self.k_offsets).reshape(-1)
        v_index = ((slot_t * (H * L * D) + pos_t[:n] * D)[:, None] + self.v_offsets).reshape(-1)
        logit_rows = list(range(nd))
        row = nd
        for ch in step.chunks:
            row += len(ch.tokens)
            if ch.logits:
                logit_rows.append(row - 1)
        r = Rows(step, n, padded, ids_t, pos_t, k_index, v_index, logit_rows)
        if nd:
            r.lo, r.hi = min(step.decode_slots), max(step.decode_slots) + 1
            r.reach = span(max(step.decode_positions), self.span_quantum, L)
            r.dense = step.decode_slots == list(range(r.lo, r.hi))
            r.dslot = slot_t[:nd] - r.lo
            seen = torch.zeros(r.hi - r.lo, device=dev, dtype=torch.long)  # idle slots: position 0 only
            seen.index_copy_(0, r.dslot, pos_t[:nd])
            r.dbias = torch.zeros(r.hi - r.lo, r.reach, dtype=self.dtype, device=dev).masked_fill_(
                self.positions[None, :r.reach] > seen[:, None], float("-inf"))[:, None, None, :]
        return r

    # --- compute ------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, r: Rows) -> torch.Tensor:
        m = self.model
        return m.tok_emb(r.ids) + m.pos_emb(r.pos)

    @torch.no_grad()
    def layers(self, x: torch.Tensor, r: Rows) -> torch.Tensor:
        """This stage's blocks over the rows `x` (padded, width), writing their keys and values."""
        H, D, n = self.n_head, self.head_dim, r.n
        nd = len(r.step.decode_tokens)
        y = x.new_zeros(r.padded, H * D)
        for block, kc, vc in zip(self.blocks, self.cache.k, self.cache.v):
            a = block.attn
            qkv = a.qkv(_layer_norm(block.ln1, x))[:n].view(n, 3, H, D)
            q, k, v = qkv.unbind(1)
            kc.view(-1).index_copy_(0, r.k_index, k.reshape(-1))
            vc.view(-1).index_copy_(0, r.v_index, v.reshape(-1))
            if nd:
                qd = q[:nd].unsqueeze(2)
                if not r.dense:
                    qd = x.new_zeros(r.hi - r.lo, H, 1, D).index_copy_(0, r.dslot, qd)
                att = attend(qd, kc[r.lo:r.hi, :, :, :r.reach], vc[r.lo:r.hi, :, :r.reach], r.dbias, self.scale)
                y[:nd] = (att if r.dense else att.index_select(0, r.dslot)).view(nd, H * D)
            row = nd
            for ch in r.step.chunks:
                c = len(ch.tokens)
                qc = q[row:row + c].transpose(0, 1).unsqueeze(0)  # (1, H, c, D)
                s = span(ch.start + c - 1, self.span_quantum, self.cache.block_size)
                att = attend(qc, kc[ch.slot:ch.slot + 1, :, :, :s], vc[ch.slot:ch.slot + 1, :, :s],
                             self.causal[ch.start:ch.start + c, :s], self.scale)
                y[row:row + c] = att[0].transpose(0, 1).reshape(c, H * D)
                row += c
            x = x + a.proj(y)
            mlp = block.mlp
            x = x + mlp.proj(gelu_tanh(mlp.fc(_layer_norm(block.ln2, x))))
        return x

    @torch.no_grad()
    def logits(self, x: torch.Tensor, r: Rows) -> torch.Tensor:
        """Float32 logits (rows, vocab) of the rows that choose a next token, whole on every tp rank."""
        m = self.model
        if not r.logit_rows:
            return torch.empty(0, self.vocab_size, device=self.device)
        k = len(r.logit_rows)
        index = torch.tensor(r.logit_rows + [0] * (pad_rows(k, self.quantum) - k), device=self.device)
        out = m.head(_layer_norm(m.ln_f, x[index]))[:k]
        if self.tp > 1:
            out = all_gather_dim(out, 1, self.tp_group)[:, :self.vocab_size]  # vocab slices, in rank order
        return out.float().contiguous()


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def local_linear_shapes(model: GPT, tp: int) -> list[tuple[int, int]]:
    """(out, in) of every matrix product a rank runs, for probing the row quantum."""
    c = model.cfg
    C = c.n_embd
    vocab = -(-c.vocab_size // tp)
    return sorted({(3 * C // tp, C), (C, C // tp), (4 * C // tp, C), (C, 4 * C // tp), (vocab, C)})
