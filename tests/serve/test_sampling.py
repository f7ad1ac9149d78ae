"""The sampler: each row's token depends only on its own logits, params and generator."""

from __future__ import annotations

import torch

from plait.serve.params import SamplingParams
from plait.serve.sampling import new_generator, sample_next

MIXED = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
         SamplingParams(temperature=1.0, top_k=5, seed=2), SamplingParams(temperature=1.3, top_p=0.9, seed=3),
         SamplingParams(temperature=0.9, top_k=40, top_p=0.5, seed=4), SamplingParams(temperature=2.0, seed=5)]


def test_rows_sampled_together_equal_rows_sampled_alone():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(len(MIXED) * 3, 256, generator=g) * 3
        params = MIXED * 3
        together_gens = [new_generator(p.seed + 100 * i if p.seed else 0) for i, p in enumerate(params)]
        alone_gens = [new_generator(p.seed + 100 * i if p.seed else 0) for i, p in enumerate(params)]
        together = sample_next(logits, params, together_gens)
        alone = [sample_next(logits[i:i + 1], [p], [gen])[0] for i, (p, gen) in enumerate(zip(params, alone_gens))]
        assert together == alone


def test_greedy_is_argmax_and_filters_hold():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 256, generator=g)
    assert sample_next(logits, [SamplingParams(temperature=0)], [None]) == [int(logits.argmax())]
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    gen = new_generator(7)
    drawn = {sample_next(logits, [SamplingParams(temperature=5.0, top_k=5)], [gen])[0] for _ in range(200)}
    assert drawn <= top5 and len(drawn) > 1
    # A nucleus smaller than the top token's probability leaves only the top token.
    peaked = logits.clone()
    peaked[0, 3] = 20.0
    assert {sample_next(peaked, [SamplingParams(top_p=0.5)], [gen])[0] for _ in range(20)} == {3}


def test_a_seed_repeats_and_seeds_differ():
    logits = torch.zeros(1, 256)  # uniform: every draw shows the generator
    p = SamplingParams(temperature=1.0, seed=42)
    a = [sample_next(logits, [p], [g])[0] for g in [new_generator(42)] for _ in range(30)]
    g = new_generator(42)
    b = [sample_next(logits, [p], [g])[0] for _ in range(30)]
    g = new_generator(43)
    c = [sample_next(logits, [p], [g])[0] for _ in range(30)]
    assert a == b and a != c
