"""PipelineParallelModel: the trainer's view of a model split into pipeline stages.

`parallelize` builds it when the mesh has pp > 1. This rank keeps only its chunks' layers (under
the plain model's names), runs the configured schedule in `forward_backward`, sums the gradients
of weights tied across stages (GPT's embedding and head), averages over its dp group, and
gathers / scatters layout-independent checkpoints. The trainer's micro-batches are the pipeline's
micro-batches (m = train.grad_accum), unless parallel.microbatches re-cuts each step's samples
into m equal pieces; either way the gradient is that of the mean loss over the step's samples,
exactly as one process computes it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import ParallelConfig
from plait.errors import ConfigError, PlanError
from plait.mesh import ParallelMesh
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel.grad_norm import GradPiece
from plait.parallel.pipeline.layers import PipelineSpec, pipeline_spec, stage_module
from plait.parallel.pipeline.p2p import PipeComm
from plait.parallel.pipeline.partition import Partition, make_partition
from plait.parallel.pipeline.runtime import PipelineRuntime, StepStats
from plait.parallel.pipeline.schedules import (Simulation, build_schedule, check_schedule, replay,
                                               theoretical_bubble)
from plait.parallel.pipeline.state import (canonical_names, full_optimizer_state, group_names,
                                           local_optimizer_state, merge_layout,
                                           named_optimizer_state, to_cpu)
from plait.parallel.base import ParallelModel
from plait.parallel.tensor_parallel.split import TensorParallel

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class PipelineParallelModel(ParallelModel):
    """This rank's pipeline stage of a plain model, over the mesh's pp (and dp) groups."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig,
                 spec: PipelineSpec | None = None, tensor: TensorParallel | None = None):
        """Cut `model` (identical on every rank) into stages and keep this rank's; with tp > 1 the
        model was already split by `parallelize`, and `tensor` is that split."""
        p = mesh.pp_size
        check_schedule(cfg.schedule, p, cfg.virtual_stages)
        spec = spec or pipeline_spec(model)
        interleaved = cfg.schedule == "interleaved"
        partition = make_partition(spec, p, cfg.virtual_stages, cfg.partition, interleaved,
                                   speeds=cfg.stage_speeds or None)
        paths = [[path for g in partition.chunks_of(r) for i in range(*partition.bounds[g])
                  for path in spec.layers[i].paths] for r in range(p)]
        stage = stage_module(model, paths[mesh.pp_rank])
        reducer = None
        if mesh.dp_size > 1:
            reducer = GradientReducer(stage, mesh.dp_group, bucket_mb=cfg.bucket_mb, mode=cfg.reducer)
        super().__init__(stage, mesh, reducer, tensor=tensor)
        self.partition: Partition = partition
        self.schedule = cfg.schedule
        self.virtual_stages = partition.virtual_stages
        self.microbatches = cfg.microbatches
        _, alias, self._order = canonical_names(model)
        self._names = {id(q): alias[n] for n, q in stage.named_parameters()}  # id -> plain name
        self._full_keys = list(model.state_dict().keys())
        self._pp_ranks = mesh.group_ranks["pp"]
        chunks = {g: nn.Sequential(*(spec.layers[i].module for i in range(*partition.bounds[g])))
                  for g in partition.chunks_of(mesh.pp_rank)}
        self.runtime = PipelineRuntime(chunks, partition, mesh.pp_rank, PipeComm(mesh.pp_group, self._pp_ranks),
                                       spec.loss_fn, cfg.schedule, mesh.device)
        self._tied, self._duplicates = self._tie_across_stages(alias, paths)
        # NCCL wants the first operation on a group to involve all its ranks, not a p2p pair.
        dist.barrier(group=mesh.pp_group)
        self.last_stats: list[StepStats] | None = None  # per pp rank, from the last step
        self.last_span_s = 0.0
        if mesh.is_main:
            log.info("%s", partition)

    # --- tied weights ---------------------------------------------------------------------

    def _tie_across_stages(self, alias: dict[str, str], paths: list[list[str]]
                           ) -> tuple[list[tuple[nn.Parameter, Any]], set[int]]:
        """Groups of the ranks holding one tied weight (per dp/tp coordinate); weights made equal.

        Returns (this rank's (parameter, group) pairs, ids of the copies not counted in norms).
        """
        names = defaultdict(list)
        for n, canon in alias.items():
            names[canon].append(n)
        held = lambda n, ps: any(n == q or n.startswith(q + ".") for q in ps)  # noqa: E731
        local = {self._names[id(q)]: q for q in self.module.parameters()}
        shape, tied, duplicates, to_sync = self.mesh.shape, [], set(), []
        for canon in sorted(c for c, ns in names.items() if len(ns) > 1):
            holders = [r for r in range(shape.pp) if any(held(n, paths[r]) for n in names[canon])]
            if len(holders) < 2:
                continue
            for dp in range(shape.dp):
                for tp in range(shape.tp):
                    ranks = [shape.rank_of(dp, h, tp) for h in holders]
                    group = dist.new_group(ranks)  # collective over the world: every rank calls
                    if self.mesh.rank in ranks:
                        to_sync.append((local[canon], group, ranks[0]))
            if self.mesh.pp_rank in holders[1:]:
                duplicates.add(id(local[canon]))
        with torch.no_grad():
            for param, group, src in to_sync:  # start from the first stage's copy
                dist.broadcast(param.data, src=src, group=group)
                tied.append((param, group))
        return tied, duplicates

    def _reduce_tied_grads(self) -> list:
        """Start summing each tied weight's gradient over its holders; returns the works to wait on."""
        works = []
        for param, group in self._tied:
            if not param.requires_grad:
                continue  # frozen: no gradient on any stage
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            works.append(dist.all_reduce(param.grad, group=group, async_op=True))
        return works

    # --- training step --------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        raise PlanError("a pipelined model has no single-process forward; its layers live on "
                        f"{self.mesh.pp_size} ranks: use forward_backward() or eval_loss()")

    def split_micro_batches(self, micro_batches: Sequence[Batch]) -> list[Batch]:
        """The trainer's micro-batches, or the step's samples cut into parallel.microbatches pieces."""
        m = self.microbatches
        if not m or m == len(micro_batches):
            return list(micro_batches)
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        if x.size(0) % m:
            raise ConfigError(
                f"parallel.microbatches={m} must divide the {x.size(0)} sequences per step and dp rank "
                "(train.micro_batch_size × train.grad_accum)"
            )
        return list(zip(x.split(x.size(0) // m), y.split(y.size(0) // m)))

    def forward_backward(self, micro_batches: Sequence[Batch],
                         autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                         ) -> torch.Tensor:
        """Run the schedule over the step's micro-batches; returns the mean loss on every rank."""
        autocast = autocast or contextlib.nullcontext
        batches = self.split_micro_batches(micro_batches)
        check_schedule(self.schedule, self.mesh.pp_size, self.virtual_stages, len(batches))
        no_sync = self.reducer.no_sync if self.reducer is not None else contextlib.nullcontext
        if self.tensor is not None:
            self.tensor.reseed(self.steps_done)
        start = time.perf_counter()
        loss_sum, stats = self.runtime.run(batches, autocast, no_sync)
        if self.tensor is not None:
            self.finish_partial_grads()
        tied = self._reduce_tied_grads()  # in flight while the step's results are shared
        loss = loss_sum / len(batches) if loss_sum is not None else torch.zeros((), device=self.mesh.device)
        # One small all-gather tells every rank the loss and every stage's timing; it ends when
        # the last stage has finished, which closes the step's span for the bubble accounting.
        mine = torch.tensor([float(loss), stats.wait_s, stats.compute_s, stats.peak_stashed, *stats.durations],
                            dtype=torch.float64, device=loss.device)
        every = [torch.empty_like(mine) for _ in self._pp_ranks]
        dist.all_gather(every, mine, group=self.mesh.pp_group)
        self.last_span_s = time.perf_counter() - start
        rows = torch.stack(every).tolist()  # one copy to the host for every stage's timings
        self.last_stats = [StepStats(compute_s=e[2], wait_s=e[1], peak_stashed=int(e[3]),
                                     microbatches=len(batches), durations=e[4:]) for e in rows]
        for work in tied:
            work.wait()
        self.steps_done += 1
        return every[-1][0].float()

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
        """Forward-only pipeline pass; the last stage's loss, on every rank."""
        loss_sum, _ = self.runtime.run([(x, y)], autocast or contextlib.nullcontext, train=False)
        loss = loss_sum if loss_sum is not None else torch.zeros((), device=self.mesh.device)
        dist.broadcast(loss, src=self._pp_ranks[-1], group=self.mesh.pp_group)
        return loss

    def step_metrics(self) -> dict[str, Any]:
        """Bubble accounting of the last step: measured per stage, and two theories.

        The step's span runs from this rank's first action until every stage has finished (the
        end-of-step all-gather). On the main rank, the first stage, which starts the step, that
        is the whole pipelined step. A stage's bubble is its idle share of the span,
        1 − compute / span; `bubble` averages the stages. `bubble_theory` is the same share for
        equal stages and free communication (:func:`theoretical_bubble`); `bubble_model` is the
        share when the schedule is replayed with the durations every action actually took and
        free communication (:func:`replay`), the bubble the step's own, possibly unequal, stage
        times force. bubble − bubble_model is what communication and the runtime added;
        bubble_model − bubble_theory is what unequal stages added. `pp_wait_s` is the part of
        each stage's idle time spent blocked on a receive inside the schedule.
        """
        if not self.last_stats:
            return {}
        s, span = self.last_stats, self.last_span_s
        per_stage = [max(0.0, 1.0 - st.compute_s / span) for st in s]
        m = s[0].microbatches
        return {
            "bubble": sum(per_stage) / len(per_stage),
            "bubble_theory": theoretical_bubble(self.schedule, self.mesh.pp_size, m, self.virtual_stages),
            "bubble_model": self._replayed(s).bubble,
            "bubble_per_stage": per_stage,
            "pp_span_s": span,
            "pp_compute_s": [st.compute_s for st in s],
            "pp_wait_s": [st.wait_s for st in s],
            "pp_peak_stashed": [st.peak_stashed for st in s],
        }

    def _replayed(self, stats: list[StepStats]) -> Simulation:
        """The last step's schedule replayed with its measured action durations, communication free."""
        plans = [build_schedule(self.schedule, self.mesh.pp_size, stats[0].microbatches,
                                self.virtual_stages, r) for r in range(self.mesh.pp_size)]
        took = {(r, a): d for r, (plan, st) in enumerate(zip(plans, stats))
                for a, d in zip(plan, st.durations)}
        return replay(plans, lambda r, a: took[(r, a)])

    def grad_pieces(self) -> list[GradPiece]:
        """Each stage's own gradients are split over "pp" (and tp shards over "tp" too); the second
        copy of a weight tied across stages is scaled but not counted, so it counts once."""
        sharded = self.tensor.is_sharded if self.tensor is not None else (lambda q: False)
        return [GradPiece(q.grad, ("pp", "tp") if sharded(q) else ("pp",), counted=id(q) not in self._duplicates)
                for q in self.module.parameters() if q.grad is not None]

    # --- checkpoints ----------------------------------------------------------------------

    def _optimizer_layout(self, optimizer: torch.optim.Optimizer) -> list[list[str]]:
        """The plain model's optimizer numbering, agreed over the pp group (collective)."""
        every: list[Any] = [None] * self.mesh.pp_size
        dist.all_gather_object(every, group_names(optimizer, self._names), group=self.mesh.pp_group)
        return merge_layout(every, self._order)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The plain model's state_dict and one process's optimizer state_dict, on the main rank."""
        layout = self._optimizer_layout(optimizer)
        if self.mesh.dp_rank != 0:
            return None  # dp replicas hold the same values
        gather = self.tensor.gather if self.tensor is not None else (lambda q, t: t)
        named = dict(self.module.named_parameters(remove_duplicate=False))
        model = {k: gather(named[k], v) if k in named else v for k, v in self.module.state_dict().items()}
        mine = {"model": to_cpu(model), "optim": named_optimizer_state(optimizer, self._names, gather)}
        if self.mesh.tp_rank != 0:
            return None  # the tp shards were gathered to every tp rank; tp rank 0 sends them on
        every = [None] * self.mesh.pp_size if self.mesh.is_main else None
        dist.gather_object(mine, every, dst=self._pp_ranks[0], group=self.mesh.pp_group)
        if not self.mesh.is_main:
            return None
        model: dict[str, torch.Tensor] = {}
        for st in every:
            model.update(st["model"])
        missing = [k for k in self._full_keys if k not in model]
        if missing:
            raise PlanError(f"pipeline stages hold no value for {missing[:3]}: the layer list misses them")
        return {"model": {k: model[k] for k in self._full_keys},
                "optim": full_optimizer_state(layout, [st["optim"] for st in every])}

    def load_checkpoint_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Each stage takes its parameters and optimizer state, by name, from a full checkpoint."""
        full = state["model"]
        cut = self.tensor.slice if self.tensor is not None else (lambda q, t, what: t)
        named = dict(self.module.named_parameters(remove_duplicate=False))
        self.module.load_state_dict({k: cut(named[k], full[k], k) if k in named else full[k]
                                     for k in self.module.state_dict()})
        layout = self._optimizer_layout(optimizer)
        optimizer.load_state_dict(local_optimizer_state(
            optimizer, self._names, layout, state["optim"],
            lambda q, t: cut(q, t, f"optimizer state of {self._names[id(q)]}")))
        step = state.get("state", {}).get("step")
        if step is not None:
            self.steps_done = int(step)
