"""The pipeline layer cut, as plain data: which of the GPT's layers each stage holds.

The GPT's pipeline layer list is [embedding, block 0 … block L−1, final norm + head]. plait's
pipeline partitions it by parameter count or analytic FLOPs with a min–max contiguous split
(`plait.balance.balance`, shared with this module), or evenly by blocks for the interleaved schedule (Megatron-LM's virtual stages, which the
`even` cost also gives a non-interleaved pipeline). This module mirrors that cut without torch so
the planner can cost each stage; a test checks it against the runtime's partition.
"""

from __future__ import annotations

import functools

from plait.balance import balance
from plait.errors import PlanError
from plait.plan.shapes import ModelShape

CUT_COSTS = ("params", "flops", "even")


def layer_costs(shape: ModelShape, cost: str) -> list[float]:
    """Per pipeline layer: parameters (the tied head weight counted on both ends, as the stage
    modules hold it) or training FLOPs per sample (as `gpt_pipeline_spec` declares them)."""
    h, s, v = shape.n_embd, shape.seq, shape.vocab
    if cost == "params":
        return ([float(shape.embedding_params())] + [float(shape.block_params())] * shape.n_layer
                + [float(shape.norm_params() + v * h)])
    if cost in ("flops", "even"):
        block = s * (6.0 * shape.block_params() + 12.0 * h * s)
        return [0.0] + [block] * shape.n_layer + [s * 6.0 * h * v]
    raise PlanError(f"pipeline cut cost {cost!r} is invalid; valid: {', '.join(CUT_COSTS)}")


def even_blocks(n_layer: int, chunks: int) -> list[tuple[int, int]]:
    """Blocks split evenly into `chunks`; the embedding joins the first, the head the last."""
    if n_layer % chunks:
        raise PlanError(f"{n_layer} blocks (model.n_layer) do not split evenly into {chunks} "
                        "pipeline chunks; choose pp × virtual_stages dividing n_layer")
    per = n_layer // chunks
    starts = [1 + g * per for g in range(chunks)]
    ends = starts[1:] + [n_layer + 2]
    starts[0] = 0
    return list(zip(starts, ends))


@functools.lru_cache(maxsize=1024)
def pipeline_cut(shape: ModelShape, pp: int, cost: str = "params",
                 virtual_stages: int = 1) -> tuple[tuple[int, int], ...]:
    """[start, end) layer bounds of each of the pp × virtual_stages chunks; chunk g runs on
    pipeline rank g mod pp."""
    layers = shape.n_layer + 2
    if pp > layers:
        raise PlanError(f"parallel.pp={pp} stages exceed the model's {layers} pipeline layers "
                        f"(embedding, {shape.n_layer} blocks, head)")
    if virtual_stages > 1 or cost == "even":
        return tuple(even_blocks(shape.n_layer, pp * virtual_stages))
    return tuple(balance(layer_costs(shape, cost), pp))


@functools.lru_cache(maxsize=1024)
def stage_layers(bounds: tuple[tuple[int, int], ...], pp: int, n_layer: int) -> tuple[tuple[bool, int, bool], ...]:
    """Per pipeline rank: (holds the embedding, number of blocks, holds the head)."""
    out = []
    for rank in range(pp):
        emb, blocks, head = False, 0, False
        for a, b in bounds[rank::pp]:
            for i in range(a, b):
                if i == 0:
                    emb = True
                elif i == n_layer + 1:
                    head = True
                else:
                    blocks += 1
        out.append((emb, blocks, head))
    return tuple(out)
