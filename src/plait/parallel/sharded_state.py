"""Each rank's own pieces of the model and optimizer state, placed in the plain model's tensors.

A sharded checkpoint (torch.distributed.checkpoint) or an in-memory snapshot stores, per rank,
only what the rank holds: tp shards, ZeRO flat shards, pipeline stages. To load under any other
layout, every piece says where it lies in the *plain* model's tensor of the same name: a box
(offsets and sizes) in that tensor. DCP then matches saved boxes against the boxes the new
layout asks for and copies the overlaps: resharding is DCP's, the geometry is here.

- a replicated tensor is one box: the whole tensor (replicas write it once, DCP deduplicates);
- a tp shard is one box per fused block (qkv: three), with the vocabulary padding dropped;
- a ZeRO piece is a contiguous range of the flattened (tp-local) parameter: a partial row, whole
  rows and a partial row, each then mapped through the tp split.

Keys: `model.<name>` for parameters and persistent buffers (tied weights once, under their
first name), `optim.<exp_avg|exp_avg_sq|step>.<name>` for AdamW's state, and
`optim.param_groups` (hyper-parameters, as bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from plait.parallel.base import ParallelModel
from plait.parallel.tensor_parallel.shard import ShardSpec, shard_spec

Offsets = tuple[int, ...]
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Boxes:
    """This rank's parts of one global tensor of shape `shape`: {offsets: tensor (a view)}."""

    shape: torch.Size
    parts: dict[Offsets, torch.Tensor]

    def size(self) -> torch.Size:  # what DCP compares against the checkpoint's metadata
        return self.shape

    def part(self, offsets: Offsets) -> torch.Tensor:
        return self.parts[tuple(offsets)]

    # --- DCP's checkpointable protocol (as DTensor implements it) -----------------------------
    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(off)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape),
                              properties=TensorProperties.create_from_tensor(t), size=self.shape))
                for off, t in self.parts.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.shape) for off, t in self.parts.items()]


def _lookup(state: dict[str, Any], index: MetadataIndex) -> Any:
    obj = state[index.fqn]
    return obj.part(tuple(index.offset)) if isinstance(obj, Boxes) else None


class BoxSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, taught to find a :class:`Boxes` part by its offsets."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = _lookup(self.state_dict, index)
        return found if found is not None else super().lookup_object(index)


class BoxLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, taught to find a :class:`Boxes` part by its offsets."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None,
                       is_coordinator: bool = False) -> None:
        # The default set-up materializes meta tensors and replaces values of any type it does
        # not know (ours) with None; every value here is real, so it is taken as it is.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = _lookup(self.state_dict, index)
        return found if found is not None else super().lookup_tensor(index)


# --- geometry ------------------------------------------------------------------------------


def flat_range_boxes(lo: int, n: int, shape: tuple[int, ...]) -> list[tuple[Offsets, tuple[int, ...], int]]:
    """Boxes covering elements [lo, lo + n) of a row-major tensor of `shape`.

    Each is (offsets, sizes, start) with `start` its first element relative to `lo`; every box is
    contiguous in memory, so it is a view of the flat range.
    """
    out: list[tuple[Offsets, tuple[int, ...], int]] = []

    def walk(lo: int, hi: int, shape: tuple[int, ...], prefix: Offsets, base: int) -> None:
        if lo >= hi:
            return
        if len(shape) <= 1:
            ones = (1,) * len(prefix)
            out.append((prefix + ((lo,) if shape else ()), ones + ((hi - lo,) if shape else ()), base + lo))
            return
        inner = math.prod(shape[1:])
        r0, r1 = -(-lo // inner), hi // inner  # whole rows r0..r1-1
        if r0 > r1:  # inside one row
            r = lo // inner
            walk(lo - r * inner, hi - r * inner, shape[1:], prefix + (r,), base + r * inner)
            return
        if lo < r0 * inner:  # partial first row
            r = r0 - 1
            walk(lo - r * inner, inner, shape[1:], prefix + (r,), base + r * inner)
        if r1 > r0:
            out.append((prefix + (r0,) + (0,) * (len(shape) - 1),
                        (1,) * len(prefix) + (r1 - r0,) + tuple(shape[1:]),
                        base + r0 * inner))
        if hi > r1 * inner:  # partial last row
            walk(0, hi - r1 * inner, shape[1:], prefix + (r1,), base + r1 * inner)

    walk(lo, lo + n, tuple(shape), (), -lo)
    return out


def tp_boxes(spec: ShardSpec | None, rank: int, tp: int, offsets: Offsets, t: torch.Tensor
             ) -> list[tuple[Offsets, torch.Tensor]]:
    """Map a box of a tp shard (offsets in the shard) to boxes of the full tensor; padding dropped."""
    if spec is None or tp == 1:
        return [(offsets, t)]
    d, per = spec.dim, spec.per_rank_block(tp)
    a, n = offsets[d], t.size(d)
    out, i = [], a
    while i < a + n:
        block, j = divmod(i, per)
        end = min(a + n, (block + 1) * per)
        valid = min(end - i, spec.block - (rank * per + j))  # rows before this rank's padding
        if valid > 0:
            g = list(offsets)
            g[d] = block * spec.block + rank * per + j
            out.append((tuple(g), t.narrow(d, i - a, valid)))
        i = end
    return out


def global_shape(p: torch.Tensor) -> torch.Size:
    """The plain model's shape of a (possibly tp-sharded) parameter."""
    spec = shard_spec(p)
    if spec is None:
        return p.shape
    shape = list(p.shape)
    shape[spec.dim] = spec.size
    return torch.Size(shape)


# --- what a rank holds ---------------------------------------------------------------------


def _tp(model: ParallelModel) -> tuple[int, int]:
    return (model.mesh.tp_rank, model.mesh.tp_size) if model.tensor is not None else (0, 1)


def _add(state: dict[str, Any], key: str, p: torch.Tensor, offsets: Offsets, t: torch.Tensor,
         tp: tuple[int, int]) -> None:
    boxes = state.setdefault(key, Boxes(global_shape(p), {}))
    for off, view in tp_boxes(shard_spec(p), tp[0], tp[1], offsets, t):
        boxes.parts[off] = view


def param_names(model: ParallelModel) -> dict[int, str]:
    """id(parameter) -> its plain-model name (tied weights: the first name)."""
    names = getattr(model, "_names", None)  # pipeline stages know their plain names
    if names is not None:
        return dict(names)
    return {id(p): n for n, p in model.module.named_parameters()}


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mname, m in module.named_modules():
        for bname, b in m._buffers.items():
            if b is not None and bname not in m._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


def _is_zero(model: ParallelModel) -> bool:
    return hasattr(model, "units") and hasattr(model, "gatherer")


def local_state(model: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's pieces of model and optimizer state as DCP state (views: nothing is copied)."""
    names = param_names(model)
    tp = _tp(model)
    state: dict[str, Any] = {}
    for name, b in _buffers(model.module).items():
        state[f"model.{name}"] = b.detach()
    in_units: set[int] = set()
    if _is_zero(model):
        opt = model._sharded(optimizer)
        for u in model.units:
            in_units.update(id(p) for p in u.params)  # held in shards, wherever they lie
            for pc in u.pieces():
                p = u.params[pc.slot]
                name, shape = names[id(p)], tuple(u.shapes[pc.slot])
                sources = {"model": u.shard[pc.shard_lo:pc.shard_hi]}
                st = opt.state.get(opt._tensor_of[pc], {})
                for k in MOMENTS:
                    if k in st:
                        sources[f"optim.{k}"] = st[k]
                if "step" in st:
                    state[f"optim.step.{name}"] = st["step"]
                for prefix, flat in sources.items():
                    for off, sizes, start in flat_range_boxes(pc.param_lo, pc.param_hi - pc.param_lo, shape):
                        view = flat[start:start + math.prod(sizes)].view(sizes)
                        _add(state, f"{prefix}.{name}", p, off, view, tp)
    seen: set[int] = set()
    for p in model.module.parameters():
        if id(p) in seen or id(p) in in_units:
            continue
        seen.add(id(p))
        name = names[id(p)]
        zeros = (0,) * p.dim()
        _add(state, f"model.{name}", p, zeros, p.detach(), tp)
        st = optimizer.state.get(p, {}) if not _is_zero(model) else {}
        for k in MOMENTS:
            if k in st:
                _add(state, f"optim.{k}.{name}", p, zeros, st[k], tp)
        if "step" in st:
            state[f"optim.step.{name}"] = st["step"]
    state["optim.param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                   for g in optimizer.param_groups]
    return state


def _new_adam_state(t: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """Empty AdamW state for `t`, shaped as AdamW's first step makes it (then overwritten)."""
    on_device = group.get("fused") or group.get("capturable")
    step = torch.zeros((), dtype=torch.float32, device=t.device if on_device else "cpu")
    return {"step": step, **{k: torch.zeros_like(t, memory_format=torch.preserve_format) for k in MOMENTS}}


def prepare_load(model: ParallelModel, optimizer: torch.optim.Optimizer, saved: Callable[[str], bool]
                 ) -> None:
    """Create optimizer state wherever the checkpoint has some (`saved(key)`), for loading into."""
    names = param_names(model)
    if _is_zero(model):
        opt = model._sharded(optimizer)
        for pieces, group in zip(opt.pieces, opt.param_groups):
            for pc, t in zip(pieces, group["params"]):
                name = names[id(model.units[pc.unit].params[pc.slot])]
                if saved(f"optim.step.{name}") and t not in opt.state:
                    opt.state[t] = _new_adam_state(t, group)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if saved(f"optim.step.{names[id(p)]}") and p not in optimizer.state:
                optimizer.state[p] = _new_adam_state(p, group)


def finish_load(model: ParallelModel, optimizer: torch.optim.Optimizer, groups: Any) -> None:
    """After DCP filled the pieces: hyper-parameters back, ZeRO's copies and gathers redone."""
    if isinstance(groups, list) and len(groups) == len(optimizer.param_groups):
        for g, saved in zip(optimizer.param_groups, groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
    if _is_zero(model):
        opt = model._sharded(optimizer)
        if opt.offload:
            with torch.no_grad():
                for u, m in zip(model.units, opt.master):
                    m.copy_(u.shard)
        model.after_step()  # stages 1/2: every rank gathers the loaded shards
