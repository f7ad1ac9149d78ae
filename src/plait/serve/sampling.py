"""Choosing each request's next token from its logits row, all rows of a step at once.

Every operation here works row by row (argmax, division, top-k values, sort, softmax, cumulative
sum, search), so a row's token does not depend on the other rows in the step. The one random draw
per token comes from the request's own generator, so a seeded request draws the same numbers
whether it runs alone or among others: seeded outputs repeat exactly.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from plait.serve.params import SamplingParams


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's generator: seeded as asked, or from the operating system's randomness."""
    g = torch.Generator(device=device)
    # Any integer seed is valid: it is taken modulo 2**64, the generator's seed range.
    g.manual_seed(seed % 2**64 if seed is not None else random.SystemRandom().getrandbits(64))
    return g


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row of `logits` (R, V) under that row's params and generator
    (None is fine for greedy rows: they draw nothing)."""
    out = [0] * logits.shape[0]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
            out[i] = t
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        rows = logits[drawn]
        ps = [params[i] for i in drawn]
        tokens = _draw(rows, ps, [generators[i] for i in drawn])
        for i, t in zip(drawn, tokens):
            out[i] = t
    return out


def _draw(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> list[int]:
    """Temperature, top-k, then top-p per row; then one uniform draw per row from its own
    generator, mapped through the row's cumulative distribution."""
    vocab = logits.shape[1]
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = logits / temps[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top = torch.topk(logits, max(ks), dim=-1).values  # sorted, exact copies of logits values
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        kth = torch.where(torch.tensor(ks, device=dev)[:, None] > 0, kth, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1]
    if nucleus:
        sub = logits[nucleus]
        sorted_logits, order = torch.sort(sub, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        tp = torch.tensor([params[i].top_p for i in nucleus], dtype=probs.dtype, device=dev)
        cut = before >= tp[:, None]  # the top token always stays (its "before" is 0)
        sub = sub.masked_fill(torch.zeros_like(cut).scatter(1, order, cut), float("-inf"))
        logits = logits.index_copy(0, torch.tensor(nucleus, device=dev), sub)
    cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in gens])
    x = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    # The first token whose cumulative probability exceeds x: never one of probability zero.
    idx = torch.searchsorted(cdf, x, right=True).clamp_(max=vocab - 1)
    return idx[:, 0].tolist()
