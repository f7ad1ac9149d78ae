"""Tensor-parallel plans: module-name patterns mapped to styles, applied to a built plain model.

    plan = {
        "tok_emb": "vocab_embedding",
        "blocks.*.attn": "heads",
        "blocks.*.attn.qkv": "column(fused=3)",
        "blocks.*.attn.proj": "row",
        ...
    }

A pattern is a dotted module name in which `*` stands for exactly one name component
(`blocks.*.mlp.fc` matches `blocks.3.mlp.fc`). A style is a :class:`Style` or the name of one
(see :data:`STYLES`). Every pattern must match at least one module, every matched module must be
of a type its style fits, and no module may match two patterns: anything else is a
:class:`~plait.errors.PlanError` naming the pattern or module. Modules the plan does not name stay
as they are, replicated on every tp rank.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.errors import PlanError
from plait.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    PositionShardEmbedding,
    ReplicatedDropout,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from plait.parallel.tensor_parallel.shard import ShardedParams, mark_partial_grad

log = logging.getLogger(__name__)


@dataclass
class PlanContext:
    """What a style needs to build its layer on this rank."""

    group: "dist.ProcessGroup"
    rank: int
    tp: int
    sequence_parallel: bool
    params: ShardedParams
    dropout_generator: torch.Generator


class Style:
    """How one module becomes tensor-parallel. `fits` lists the module types it applies to."""

    name: str = "style"
    fits: tuple[type, ...] = (nn.Module,)

    def check(self, name: str, module: nn.Module, tp: int) -> None:
        """Raise PlanError when `module` cannot be split over `tp` ranks (before anything changes)."""

    def apply(self, name: str, module: nn.Module, ctx: PlanContext) -> nn.Module:
        """The module that takes `module`'s place (may be `module` itself)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _divisible(name: str, what: str, value: int, tp: int) -> None:
    if value % tp:
        raise PlanError(f"{name}: {what}={value} is not divisible by parallel.tp={tp}; "
                        f"choose a tp that divides {value}")


@dataclass(repr=False)
class ColumnParallel(Style):
    """nn.Linear split by output features; `fused` equal output blocks are split separately."""

    fused: int = 1
    name: str = field(default="column", init=False)
    fits = (nn.Linear,)

    def check(self, name: str, module: nn.Linear, tp: int) -> None:
        if module.out_features % self.fused:
            raise PlanError(f"{name}: out_features={module.out_features} is not divisible by fused={self.fused}")
        _divisible(name, "out_features" + (f"/{self.fused}" if self.fused > 1 else ""),
                   module.out_features // self.fused, tp)

    def apply(self, name: str, module: nn.Linear, ctx: PlanContext) -> nn.Module:
        return ColumnParallelLinear(module, ctx.group, fused=self.fused, params=ctx.params,
                                    sequence_parallel=ctx.sequence_parallel, name=name)

    def __repr__(self) -> str:
        return f"column(fused={self.fused})" if self.fused > 1 else "column"


class RowParallel(Style):
    """nn.Linear split by input features, after a column-parallel layer."""

    name = "row"
    fits = (nn.Linear,)

    def check(self, name: str, module: nn.Linear, tp: int) -> None:
        _divisible(name, "in_features", module.in_features, tp)

    def apply(self, name: str, module: nn.Linear, ctx: PlanContext) -> nn.Module:
        return RowParallelLinear(module, ctx.group, sequence_parallel=ctx.sequence_parallel,
                                 params=ctx.params, name=name)


class VocabEmbedding(Style):
    """nn.Embedding split by vocabulary rows (padded to a multiple of tp)."""

    name = "vocab_embedding"
    fits = (nn.Embedding,)

    def apply(self, name: str, module: nn.Embedding, ctx: PlanContext) -> nn.Module:
        return VocabParallelEmbedding(module, ctx.group, sequence_parallel=ctx.sequence_parallel,
                                      params=ctx.params, name=name)


class VocabHead(Style):
    """The output nn.Linear to vocabulary logits, split by vocabulary (stays tied to the embedding)."""

    name = "vocab_head"
    fits = (nn.Linear,)

    def apply(self, name: str, module: nn.Linear, ctx: PlanContext) -> nn.Module:
        return VocabParallelHead(module, ctx.group, sequence_parallel=ctx.sequence_parallel,
                                 params=ctx.params, name=name)


class VocabLoss(Style):
    """nn.CrossEntropyLoss replaced by the vocab-parallel cross-entropy."""

    name = "vocab_loss"
    fits = (nn.CrossEntropyLoss,)

    def check(self, name: str, module: nn.CrossEntropyLoss, tp: int) -> None:
        if module.reduction != "mean" or module.label_smoothing != 0.0 or module.weight is not None:
            raise PlanError(f"{name}: vocab_loss supports reduction='mean' without label smoothing "
                            f"or class weights (got reduction={module.reduction!r})")

    def apply(self, name: str, module: nn.CrossEntropyLoss, ctx: PlanContext) -> nn.Module:
        return VocabParallelCrossEntropy(ctx.group, ignore_index=module.ignore_index)


class SequenceParallel(Style):
    """A norm layer between blocks: split along the sequence with sequence parallelism
    (its parameter gradients are then summed over tp), replicated otherwise."""

    name = "sequence_parallel"
    fits = (nn.LayerNorm, nn.RMSNorm)

    def apply(self, name: str, module: nn.Module, ctx: PlanContext) -> nn.Module:
        if ctx.sequence_parallel:
            for p in module.parameters():
                mark_partial_grad(p)
        return module


class PositionEmbedding(Style):
    """A position table: with sequence parallelism it returns this rank's positions only."""

    name = "position_embedding"
    fits = (nn.Embedding,)

    def apply(self, name: str, module: nn.Embedding, ctx: PlanContext) -> nn.Module:
        return PositionShardEmbedding(module, ctx.group) if ctx.sequence_parallel else module


class Dropout(Style):
    """Dropout between blocks: sequence-split with sequence parallelism (each rank its own mask),
    else replicated (every tp rank the same mask)."""

    name = "dropout"
    fits = (nn.Dropout,)

    def apply(self, name: str, module: nn.Dropout, ctx: PlanContext) -> nn.Module:
        if ctx.sequence_parallel or module.p == 0.0:
            return module
        return ReplicatedDropout(module.p, ctx.dropout_generator)


@dataclass(repr=False)
class Heads(Style):
    """An attention module whose heads are split over tp: checks `attr` (the head count) divides
    by tp and records the local count. Split its projections with column/row styles."""

    attr: str = "n_head"
    name: str = field(default="heads", init=False)

    def check(self, name: str, module: nn.Module, tp: int) -> None:
        heads = getattr(module, self.attr, None)
        if not isinstance(heads, int):
            raise PlanError(f"style 'heads' fits attention modules with an integer {self.attr!r} "
                            f"attribute, but {name!r} ({type(module).__name__}) has none")
        if heads % tp:
            raise PlanError(f"{name}: {self.attr}={heads} attention heads are not divisible by "
                            f"parallel.tp={tp}; choose a tp that divides the head count (model.n_head)")

    def apply(self, name: str, module: nn.Module, ctx: PlanContext) -> nn.Module:
        setattr(module, self.attr, getattr(module, self.attr) // ctx.tp)
        return module


STYLES: dict[str, Style] = {s.name: s for s in (
    ColumnParallel(), RowParallel(), VocabEmbedding(), VocabHead(), VocabLoss(),
    SequenceParallel(), PositionEmbedding(), Dropout(), Heads(),
)}

Plan = Mapping[str, Union[str, Style]]


def _style(pattern: str, style: str | Style) -> Style:
    """A Style, from itself, a name in STYLES, or a name with keyword options: "column(fused=3)"."""
    if isinstance(style, Style):
        return style
    if isinstance(style, str):
        name, _, args = style.partition("(")
        name = name.strip()
        if name in STYLES and not args:
            return STYLES[name]
        if name in STYLES and args.endswith(")"):
            options = _options(pattern, args[:-1])
            try:
                return type(STYLES[name])(**options)
            except TypeError:
                raise PlanError(f"plan entry {pattern!r}: style {name!r} takes no options "
                                f"{sorted(options)}") from None
    raise PlanError(f"plan entry {pattern!r}: style {style!r} is unknown; valid: {', '.join(STYLES)} "
                    "(optionally with options, e.g. 'column(fused=3)'), or a "
                    "plait.parallel.tensor_parallel.plan.Style")


def _options(pattern: str, text: str) -> dict[str, int]:
    """`fused=3, x=2` -> {"fused": 3, "x": 2}; options are integers."""
    options = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier() or not value.strip().lstrip("-").isdigit():
            raise PlanError(f"plan entry {pattern!r}: option {item!r} must be name=integer, "
                            "e.g. 'column(fused=3)'")
        options[key.strip()] = int(value)
    return options


def _matches(pattern: str, name: str) -> bool:
    parts, names = pattern.split("."), name.split(".")
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, names))


def resolve_plan(model: nn.Module, plan: Plan, tp: int) -> list[tuple[str, nn.Module, Style]]:
    """Match the plan to `model` and check every style fits: [(module name, module, style)].

    Pure: nothing is changed and nothing communicates, so a bad plan fails on every rank alike.
    """
    if not isinstance(plan, Mapping) or not plan:
        raise PlanError("the tensor-parallel plan must be a non-empty mapping of module-name "
                        f"patterns to styles, got {plan!r}")
    modules = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, tuple[str, nn.Module, Style]] = {}
    for pattern, style_ref in plan.items():
        style = _style(pattern, style_ref)
        hits = [(n, m) for n, m in modules if _matches(pattern, n)]
        if not hits:
            examples = ", ".join(n for n, _ in modules[:6])
            raise PlanError(f"plan entry {pattern!r} names no module of {type(model).__name__}; "
                            f"module names look like: {examples}, ...")
        for name, module in hits:
            if name in chosen:
                raise PlanError(f"module {name!r} is matched by plan entries {chosen[name][0]!r} "
                                f"and {pattern!r}; give each module one style")
            if not isinstance(module, style.fits):
                fits = " or ".join(t.__name__ for t in style.fits)
                raise PlanError(f"plan entry {pattern!r}: style {style!r} fits {fits}, but {name!r} "
                                f"is a {type(module).__name__}")
            style.check(name, module, tp)
            chosen[name] = (pattern, module, style)
    order = {n: i for i, (n, _) in enumerate(modules)}
    return [(n, m, s) for n, (_, m, s) in sorted(chosen.items(), key=lambda kv: order[kv[0]])]


def apply_plan(model: nn.Module, plan: Plan, group, *, sequence_parallel: bool = False,
               dropout_generator: torch.Generator | None = None) -> nn.Module:
    """Replace, in place, each module the plan names by its tensor-parallel form on this rank.

    Each new layer keeps this rank's shard of the plain layer's weights; parameters of modules
    the plan does not name are kept as they are. Returns `model`.
    """
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    resolved = resolve_plan(model, plan, tp)
    ctx = PlanContext(group=group, rank=rank, tp=tp, sequence_parallel=sequence_parallel,
                      params=ShardedParams(rank, tp),
                      dropout_generator=dropout_generator or torch.Generator())
    for name, module, style in resolved:
        new = style.apply(name, module, ctx)
        if new is not module:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
        log.debug("tp rank %d: %s -> %r", rank, name, style)
    return model
