"""Layer freezing: train only the upper part of a model.

`freeze_blocks(model, k)` freezes the first k blocks of `model.blocks` and the embedding tables
that feed them, and cuts the graph at the output of block k-1, so backward stops there: the frozen
part gets no gradient computation at all (not even the activation gradients that would flow
through it) and, having no trainable parameters, no gradient communication. Apply it before
`parallelize`, which only reduces and shards parameters that require gradients.

Embeddings: an `nn.Embedding` outside the blocks is frozen too, unless its weight is shared with
a trainable layer. The GPT's token embedding is tied to the output head, so it keeps training
through the head; its input-side gradient, which would need backward through the frozen blocks,
is dropped. The position embedding is frozen.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from plait.errors import ConfigError
from plait.parallel.blocks import require_blocks


def freeze_blocks(model: nn.Module, k: int) -> list[str]:
    """Freeze blocks[0:k] and the untied embeddings; returns the names of the frozen parameters."""
    if k == 0:
        return []
    blocks = require_blocks(model, "train.freeze_blocks")
    if not 0 <= k <= len(blocks):
        raise ConfigError(f"train.freeze_blocks={k} must be in [0, {len(blocks)}] (the model's blocks)")
    frozen_modules = {id(m) for b in blocks[:k] for m in b.modules()}
    block_modules = {id(m) for b in blocks for m in b.modules()}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m) not in block_modules:
            frozen_modules.add(id(m))
    # A weight tied to any module we keep training stays trainable.
    owned = [(id(m) in frozen_modules, p) for m in model.modules() for p in m.parameters(recurse=False)]
    keep = {id(p) for is_frozen, p in owned if not is_frozen}
    candidates = {id(p) for is_frozen, p in owned if is_frozen}
    frozen = []
    for name, p in model.named_parameters():
        if id(p) in candidates and id(p) not in keep:
            p.requires_grad_(False)
            frozen.append(name)
    blocks[k - 1].register_forward_hook(_detach_output)
    return frozen


def _detach_output(module, args, output):
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output)
