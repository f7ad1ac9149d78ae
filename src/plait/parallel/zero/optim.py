"""The ZeRO optimizer: AdamW over this rank's shard only, optionally on the CPU (ZeRO-Offload).

Each parameter's part inside this rank's shard is one 1-D "piece" tensor, a view of the shard, in
the same parameter group (weight decay or not) as in :func:`plait.optim.optimizer_groups`.
AdamW is element-wise, so stepping the pieces gives exactly the update plain AdamW gives those
elements, with 1/dp of the state per rank.

With `offload`, the pieces are views of a CPU master copy of the shard (pinned on CUDA): the
gradient shard is copied to the CPU, AdamW updates the master and its state there, and the new
values are copied back into the device shard before the parameters are gathered.

:meth:`ShardedAdamW.full_state_dict` gathers the state into exactly the form a plain AdamW's
`state_dict()` has (full tensors, one index per parameter, same groups), and
:meth:`ShardedAdamW.load_full_state_dict` takes that form back, so checkpoints move between plain
data parallelism and any ZeRO stage or dp size.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import TrainConfig
from plait.parallel.zero.flat import FlatUnit, Piece
from plait.optim import optimizer_groups

STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state (amsgrad is not used)


class GradSource(Protocol):
    """What a ZeRO stage tells the optimizer: where each piece's gradient is, and what to do after."""

    def piece_grad(self, piece: Piece) -> torch.Tensor | None: ...

    def after_step(self) -> None: ...

    def zero_grad(self) -> None: ...


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over the pieces of this rank's shards; `step` ends with the stage's `after_step`."""

    def __init__(self, model: nn.Module, units: list[FlatUnit], source: GradSource, cfg: TrainConfig,
                 group: "dist.ProcessGroup | None", offload: bool = False):
        self.units = units
        self.source = source
        self.dp_group = group
        self.world = units[0].world if units else 1
        self.offload = offload
        device = units[0].full.device if units else torch.device("cpu")
        pin = offload and device.type == "cuda"
        # Master shard per unit: the device shard itself, or its CPU copy when offloading.
        self.master = [torch.empty(u.shard_numel, dtype=u.shard.dtype, pin_memory=pin).copy_(u.shard)
                       if offload else u.shard for u in units]
        self.cpu_grads = [torch.zeros(u.shard_numel, dtype=u.shard.dtype, pin_memory=pin)
                          for u in units] if offload else []
        # Map every trainable parameter to (group index, index in the plain optimizer's state).
        where = {id(u.params[s]): (u.index, s) for u in units for s in range(len(u.params))}
        self.full_groups = optimizer_groups(model, cfg)
        self.param_index: dict[tuple[int, int], tuple[int, int]] = {}  # (unit, slot) -> (group, idx)
        self.group_ids: list[list[int]] = []  # the plain optimizer's parameter indices per group
        idx = 0
        for gi, g in enumerate(self.full_groups):
            self.group_ids.append([])
            for p in g["params"]:
                self.param_index[where[id(p)]] = (gi, idx)
                self.group_ids[gi].append(idx)
                idx += 1
        self.pieces: list[list[Piece]] = [[] for _ in self.full_groups]
        tensors: list[list[torch.Tensor]] = [[] for _ in self.full_groups]
        for u in units:
            for pc in u.pieces():
                gi, _ = self.param_index[(pc.unit, pc.slot)]
                self.pieces[gi].append(pc)
                tensors[gi].append(self.master[u.index][pc.shard_lo:pc.shard_hi])
        self._tensor_of = {pc: t for pcs, ts in zip(self.pieces, tensors) for pc, t in zip(pcs, ts)}
        groups = [{"params": t, "weight_decay": g["weight_decay"]} for t, g in zip(tensors, self.full_groups)]
        super().__init__(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         fused=device.type == "cuda" and not offload)

    # --- stepping ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - AdamW.step on the pieces, then gather
        for pieces, group in zip(self.pieces, self.param_groups):
            for pc, t in zip(pieces, group["params"]):
                g = self.source.piece_grad(pc)
                if g is not None and self.offload:
                    g = self.cpu_grads[pc.unit][pc.shard_lo:pc.shard_hi].copy_(g)
                t.grad = g
        loss = super().step(closure)
        if self.offload:
            for u, m in zip(self.units, self.master):
                u.shard.copy_(m)
        self.source.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=True)  # piece grads are views; never write zeros into them
        self.source.zero_grad()

    # --- layout-independent state ------------------------------------------------------------

    def full_state_dict(self) -> dict[str, Any] | None:
        """Collective over the dp group: the state as a plain AdamW would hold it, on dp rank 0."""
        me = dist.get_rank(self.dp_group) if self.world > 1 else 0
        state: dict[int, dict[str, torch.Tensor]] = {}
        for u in self.units:
            steps = torch.full((len(u.params),), -1.0, dtype=torch.float64)
            flats = {k: torch.zeros(u.shard_numel, dtype=u.shard.dtype, device=u.shard.device)
                     for k in STATE_KEYS}
            for pc in u.pieces():
                st = self._state_of(pc)
                if not st:
                    continue
                steps[pc.slot] = float(st["step"])
                for k in STATE_KEYS:
                    flats[k][pc.shard_lo:pc.shard_hi].copy_(st[k])
            if self.world > 1:
                dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.dp_group)
            fulls = {}
            for k, shard in flats.items():
                full = torch.empty(u.padded, dtype=shard.dtype, device=shard.device) if me == 0 else None
                if self.world > 1:
                    dist.gather(shard, None if me else list(full.chunk(self.world)),
                                dst=dist.get_global_rank(self.dp_group, 0), group=self.dp_group)
                else:
                    full.copy_(shard)
                fulls[k] = full
            if me != 0:
                continue
            for slot, step in enumerate(steps.tolist()):
                if step < 0:
                    continue  # never stepped: plain AdamW has no state for it either
                _, idx = self.param_index[(u.index, slot)]
                state[idx] = {"step": torch.tensor(step, dtype=torch.float32),
                              **{k: u.param_flat(slot, fulls[k]).clone() for k in STATE_KEYS}}
        if me != 0:
            return None
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(ids)}
                  for group, ids in zip(self.param_groups, self.group_ids)]
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_full_state_dict(self, full: dict[str, Any]) -> None:
        """Take this rank's share of a plain AdamW state dict (as :meth:`full_state_dict` makes)."""
        saved_groups = full["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, this "
                             f"optimizer {len(self.param_groups)}")
        for gi, (saved, ids) in enumerate(zip(saved_groups, self.group_ids)):
            if len(saved["params"]) != len(ids):
                raise ValueError(f"optimizer group {gi} has {len(saved['params'])} parameters in the "
                                 f"checkpoint, {len(ids)} here")
        state, groups, n = {}, [], 0
        for gi, (saved, pieces) in enumerate(zip(saved_groups, self.pieces)):
            ids = []
            for pc in pieces:
                _, idx = self.param_index[(pc.unit, pc.slot)]
                src = full["state"].get(idx)
                if src is not None:
                    state[n] = {"step": src["step"],
                                **{k: src[k].reshape(-1)[pc.param_lo:pc.param_hi] for k in STATE_KEYS}}
                ids.append(n)
                n += 1
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
        self.load_state_dict({"state": state, "param_groups": groups})

    def _state_of(self, pc: Piece) -> dict[str, Any]:
        return self.state.get(self._tensor_of[pc], {})
