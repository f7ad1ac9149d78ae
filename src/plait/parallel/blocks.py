"""The repeated blocks of a model, and its trainable parameters grouped per block.

Per-block strategies (ZeRO-3 gathering, recomputation, freezing) work on `model.blocks`, the
`nn.ModuleList` in which the plain GPT keeps its transformer blocks; any model that keeps its
repeated layers there gets them too. Everything outside the blocks (embeddings, final norm,
head) forms the "root" group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from plait.errors import PlanError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """`model.blocks` as a list, or [] when the model has no such ModuleList."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def require_blocks(model: nn.Module, what: str) -> list[nn.Module]:
    """Like :func:`transformer_blocks`, but a model without blocks is a clear error for `what`."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise PlanError(f"{what} works per block and needs the model's blocks in `model.blocks` "
                        f"(an nn.ModuleList); {type(model).__name__} has none")
    return blocks


@dataclass
class ParamGroup:
    """Trainable parameters that belong together: one block's, or the root's (`block` is None)."""

    block: int | None
    module: nn.Module
    names: list[str]
    params: list[nn.Parameter]


def group_by_block(model: nn.Module) -> list[ParamGroup]:
    """Trainable parameters per block (forward order), then the rest as the root group (last).

    Groups with no trainable parameter (frozen blocks) are left out. A parameter shared between a
    block and anything else would be gathered and reduced twice, so it is refused.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = transformer_blocks(model)
    owner: dict[int, int] = {}
    in_blocks: set[int] = set()
    for i, block in enumerate(blocks):
        in_blocks.update(id(m) for m in block.modules())
        for p in block.parameters():
            if owner.setdefault(id(p), i) != i:
                raise PlanError(f"parameter {names[id(p)]!r} is shared by blocks {owner[id(p)]} and {i}; "
                                "per-block sharding needs each block's parameters to be its own")
    for name, mod in model.named_modules():
        if id(mod) in in_blocks:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in owner:
                raise PlanError(f"parameter {names[id(p)]!r} of block {owner[id(p)]} is shared with "
                                f"{name}.{pname}; per-block sharding needs each block's parameters "
                                "to be its own")
    groups: list[ParamGroup] = []
    for i, block in enumerate(blocks):
        ps = [p for p in block.parameters() if p.requires_grad]
        if ps:
            groups.append(ParamGroup(i, block, [names[id(p)] for p in ps], ps))
    root = [p for p in model.parameters() if p.requires_grad and id(p) not in owner]
    if root:  # model.parameters() lists a tied weight once
        groups.append(ParamGroup(None, model, [names[id(p)] for p in root], root))
    return groups
