"""The training loop: micro-batches, gradient accumulation, clipping, schedule, eval, checkpoints.

The trainer never prints. It logs, writes metrics, and calls the callbacks it is given (the CLI
passes a progress bar on the main rank).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from plait.config import Config, validate
from plait.data.dataset import TokenDataset
from plait.data.sampler import ElasticSampler
from plait.elastic.noise_scale import BatchMonitor
from plait.elastic.samples import SampleLog
from plait.errors import CheckpointError, ConfigError, PlanError
from plait.mesh import ParallelMesh
from plait.models.build import build_model
from plait.parallel.memory.activation_cache import ActivationCache, cache_frozen_prefix
from plait.parallel.memory.freeze import freeze_blocks
from plait.parallel import ParallelModel, parallelize
from plait.parallel.parallelize import check_mesh_sizes
from plait.profile.phases import DATA, OPTIMIZER
from plait.profile.session import PerfSession, prepare_model
from plait.train.checkpoint import load_checkpoint, newest_valid_checkpoint, save_checkpoint, set_aside
from plait.train.compile import compile_model
from plait.train.durability import Durability
from plait.train.metrics import MetricsWriter, device_peak_flops, mfu
from plait.optim import lr_at, scaled_schedule

log = logging.getLogger(__name__)


@dataclass
class Callbacks:
    """Hooks the trainer calls on the main rank (all optional)."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    on_eval: Callable[[dict[str, Any]], None] | None = None
    on_end: Callable[[dict[str, Any]], None] | None = None


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


class Trainer:
    """Trains cfg.model (a GPT, or the digits MLP data-parallel) on `train_data` over `mesh`;
    resumes from checkpoints as configured."""

    def __init__(self, cfg: Config, mesh: ParallelMesh, train_data: TokenDataset,
                 val_data: TokenDataset, callbacks: Callbacks | None = None):
        # The same checks the CLI makes, so a library caller gets the same ConfigError.
        validate(cfg)
        try:  # parallelize checks this too, but only after the model is built
            check_mesh_sizes(cfg.parallel, mesh)
        except PlanError as exc:
            raise ConfigError(str(exc)) from None
        self.cfg = cfg
        self.mesh = mesh
        self.device = mesh.device
        self.train_data, self.val_data = train_data, val_data
        self.callbacks = callbacks or Callbacks()
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        t = cfg.train

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, t.seed).to(self.device)
        if t.loss_chunk_rows:  # the GPT's head and loss fused over row chunks (no whole logits)
            model.loss_chunk_rows = t.loss_chunk_rows
        if cfg.model.init_from:  # "hf:PATH": every rank starts from the same GPT-2 weights
            from plait.models.hf_gpt2 import load_hf_weights
            load_hf_weights(model, cfg.model.init_from.removeprefix("hf:"))
        # Counted on the whole model: parallelize may split it in place (tensor parallelism).
        self.flops_per_token = (model.flops_per_token(cfg.model.block_size)
                                if hasattr(model, "flops_per_token") else None)
        self.num_params = model.num_params()  # likewise: pipeline stages hold only their layers
        freeze_blocks(model, t.freeze_blocks)  # before parallelize: frozen weights are not reduced
        self.frozen_prefix = None
        if t.freeze_cache:  # the frozen prefix runs once per sample; later passes read it back
            self.frozen_prefix = cache_frozen_prefix(
                model, t.freeze_blocks, ActivationCache(t.freeze_cache_mb, t.freeze_cache_dir or None))
        if cfg.distill.teacher:  # the loss blends in a teacher's softened outputs
            from plait.train.distill import attach_teacher
            attach_teacher(model, cfg, self.device)
        # The [profile] testing slow-down, and pipeline stage speeds on uneven hardware.
        prepared = prepare_model(model, cfg, mesh)
        self.model: ParallelModel = parallelize(model, mesh, prepared.parallel)
        if t.compile:  # in place, after the layout's hooks: same parameters, same checkpoint keys
            compile_model(self.model.module, t)
        self.optimizer = self.model.build_optimizer(t)
        # [checkpoint]: sharded saves, in-memory snapshots, preemption (collective set-up).
        self.durability = Durability(cfg, mesh, self.model, self.optimizer)
        # [elastic]: gradient noise scale and adaptive batch (None when off); before resuming.
        self.batch_monitor = BatchMonitor.attach(self.model, mesh, cfg)
        self.autocast_dtype = resolve_dtype(cfg, self.device)
        # train.lr_scaling: the schedule's peak lr follows the global batch; metrics log the lr used.
        self.schedule = scaled_schedule(t, t.micro_batch_size * t.grad_accum * mesh.dp_size)
        if self.schedule is not t and mesh.is_main:
            log.info("train.lr_scaling=%s: global batch %d (reference %d), peak lr %.4g -> %.4g",
                     t.lr_scaling, t.micro_batch_size * t.grad_accum * mesh.dp_size, t.reference_batch,
                     t.lr, self.schedule.lr)
        self.sampler = ElasticSampler(len(train_data), mesh.dp_size, mesh.dp_rank,
                                      t.micro_batch_size, seed=t.seed)
        self.step = 0
        # Dropout streams differ per rank, like independent devices would.
        torch.manual_seed(t.seed + 7919 * (mesh.rank + 1))
        self.resumed_from: Path | None = None
        self._resume()
        # A resumed run drops the records its predecessor wrote after the checkpoint.
        resumed = self.resumed_from is not None
        self.metrics = MetricsWriter(self.out_dir, enabled=mesh.is_main,
                                     resumed_step=self.step if resumed else None, fresh=not resumed)
        # Traces, live straggler statistics and the uneven dp split (plait.profile).
        self.perf = PerfSession(cfg, mesh, self.model, self.sampler, self.out_dir, self.step)
        self.sample_log = (SampleLog(self.out_dir, mesh, self.step if resumed else None, fresh=not resumed)
                           if cfg.elastic.log_samples else None)
        self.peak_flops = device_peak_flops(self.device)

    # --- checkpoints ------------------------------------------------------------------------

    def _resume(self) -> None:
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return
        path = self._pick_checkpoint() if choice == "auto" else Path(choice)
        # [checkpoint] snapshot: the in-memory copy of a later step wins over the disk checkpoint.
        snapshot = self.durability.newer_snapshot(path) if choice == "auto" else None
        if snapshot is not None or path is not None:
            self.load(snapshot or path)

    def _pick_checkpoint(self) -> Path | None:
        """The checkpoint "auto" resumes from, chosen by rank 0 and broadcast to every rank.

        Ranks on a shared filesystem may see different newest folders (caching, a save in
        flight), so one rank decides for all. Damaged checkpoints newer than the chosen one are
        set aside, never overwritten; with only damaged ones, the run stops rather than start
        over on top of them.
        """
        decision: list[Any] = [None, None]  # [path or None, error message or None]
        if self.mesh.is_main:
            try:
                decision[0] = self._choose_checkpoint()
            except (OSError, CheckpointError) as exc:  # every rank stops, none waits forever
                decision[1] = str(exc)
        if dist.is_initialized() and self.mesh.world_size > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise CheckpointError(decision[1])
        return Path(decision[0]) if decision[0] is not None else None

    def _choose_checkpoint(self) -> str | None:
        """Rank 0's choice for :meth:`_pick_checkpoint`."""
        path, refused = newest_valid_checkpoint(self.ckpt_dir)
        if path is None and refused:
            reasons = "; ".join(str(exc) for _, exc in refused)
            raise CheckpointError(
                f'checkpoint.resume="auto" found no checkpoint under {str(self.ckpt_dir)!r} that '
                f"verifies ({reasons}); nothing was changed. Repair or remove them, resume from "
                'one with checkpoint.resume=PATH, or start afresh with checkpoint.resume="none" '
                "(plait train --fresh), which keeps a damaged folder in the way of a save as "
                "step_*.damaged")
        for damaged, exc in refused:  # newer than `path`: this run would save over them
            set_aside(damaged, str(exc))
        return str(path) if path is not None else None

    def load(self, path: str | Path) -> None:
        """Restore model, optimizer, sampler position, RNG and step from a checkpoint."""
        if self.durability.handles(path):  # sharded checkpoint or snapshot: each rank its pieces
            parts = self.durability.load(path)
        else:
            parts = load_checkpoint(path, map_location=self.device)
            missing = {"model", "optim", "state"} - set(parts)
            if missing:
                raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(sorted(missing))}")
            try:
                self.model.load_checkpoint_state(self.optimizer, parts)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} does not fit this model/optimizer (check [model]): {exc}"
                ) from None
        self._load_comm_state(parts.get("comm"), path)
        state = parts["state"]
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self._load_rng(state)
        if self.batch_monitor is not None and "elastic" in state:
            self.batch_monitor.load_state_dict(state["elastic"])
        self.resumed_from = Path(path)
        log.info("resumed from %s at step %d", path, self.step)

    def _load_rng(self, state: dict[str, Any]) -> None:
        """Give each rank its dropout streams back: the CPU generator's and, on CUDA, the device's.

        Under another world size the saved streams cannot be matched to ranks, so they are
        re-seeded from the step; a checkpoint without CUDA states (saved on the CPU) re-seeds
        the CUDA generator the same way.
        """
        rng, cuda_rng = state.get("rng", []), state.get("cuda_rng")
        rank, world = self.mesh.rank, self.mesh.world_size
        seed = self.cfg.train.seed + 7919 * (rank + 1) + self.step
        if len(rng) != world:
            log.info("world size changed (%d -> %d): dropout RNG streams are re-seeded", len(rng), world)
            torch.manual_seed(seed)  # seeds the CUDA generators too
            return
        torch.set_rng_state(rng[rank].cpu())
        if self.device.type != "cuda":
            return
        if isinstance(cuda_rng, list) and len(cuda_rng) == world and cuda_rng[rank] is not None:
            torch.cuda.set_rng_state(cuda_rng[rank].cpu(), self.device)
        else:
            log.info("the checkpoint has no CUDA RNG state for rank %d: its CUDA dropout stream "
                     "is re-seeded", rank)
            torch.cuda.manual_seed(seed)

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's CPU generator state and, on CUDA, its device generator state."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _rank_state(self) -> dict[str, Any]:
        """This rank's trainer state for an in-memory snapshot (the model's is taken apart)."""
        rng, cuda = self._rng_state()
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": rng, "cuda_rng": cuda}
        if self.batch_monitor is not None:
            state["elastic"] = self.batch_monitor.state_dict()
        return state

    def _load_comm_state(self, comm: list[Any] | None, path: str | Path) -> None:
        """Give each rank its own compression state back, when the checkpoint has one that fits."""
        if comm is None:
            return
        if not self.model.keeps_comm_state:
            log.info("checkpoint %s: its gradient-compression state is unused (this run does not "
                     "compress)", path)
            return
        if not isinstance(comm, list) or len(comm) != self.mesh.world_size:
            fits = False
        else:
            fits = self.model.load_comm_state(comm[self.mesh.rank])
        if dist.is_initialized() and self.mesh.world_size > 1:  # every rank, or none, goes on with it
            flag = torch.tensor([0.0 if fits else 1.0], device=self.device)
            dist.all_reduce(flag)
            fits = flag.item() == 0
        if not fits:
            log.warning("checkpoint %s: its gradient-compression state does not fit this run (world "
                        "size, compression or buckets changed); compression restarts with its "
                        "warm-up", path)
            self.model.reset_comm_state()

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (main rank writes; all ranks take part)."""
        sharded = self.durability.sharded  # each rank writes its own pieces and compression state
        per_rank = (*self._rng_state(), None if sharded else self.model.comm_state())
        if dist.is_initialized() and self.mesh.world_size > 1:
            # Gathered on the main rank only: compression state is as large as the gradients.
            gathered: list[Any] | None = [None] * self.mesh.world_size if self.mesh.is_main else None
            dist.gather_object(per_rank, gathered, dst=0)
        else:
            gathered = [per_rank]
        path = None
        parts = None if sharded else self.model.checkpoint_state(self.optimizer)  # collective
        state = None
        if self.mesh.is_main:
            state = {"step": self.step, "sampler": self.sampler.state_dict(),
                     "rng": [rng for rng, _, _ in gathered],
                     "config": self.cfg.to_dict(), "mesh": vars(self.mesh.shape)}
            if self.batch_monitor is not None:
                state["elastic"] = self.batch_monitor.state_dict()
            cuda_rng = [c for _, c, _ in gathered]
            if any(c is not None for c in cuda_rng):
                state["cuda_rng"] = cuda_rng
            comm = [c for _, _, c in gathered]
            extra = {"comm": comm} if any(c is not None for c in comm) else {}
            if not sharded:
                path = save_checkpoint(self.ckpt_dir, self.step, {**parts, "state": state, **extra},
                                       keep=self.cfg.checkpoint.keep)
        if sharded:  # collective; asynchronous with checkpoint.async_save (published later)
            path = self.durability.save(self.step, state)
        self.mesh.barrier()
        return path

    # --- steps ------------------------------------------------------------------------------

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _autocast(self):
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, sync: bool = True) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns loss, lr and grad norm.

        `sync` False returns the loss and grad norm as 0-d device tensors instead of floats, so
        that on a GPU the host does not wait for the step to finish (see :meth:`fit`)."""
        t = self.cfg.train
        lr = lr_at(self.step, self.schedule)
        monitor = self.batch_monitor
        if monitor is not None and monitor.adaptive:  # the adaptive batch's lr gain
            lr *= monitor.lr_factor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = []
        with self.perf.phase(DATA):
            for _ in range(monitor.grad_accum if monitor is not None else t.grad_accum):
                idx = self.sampler.next_indices()
                if self.sample_log is not None:
                    self.sample_log.draw(self.sampler.epoch, idx)
                x, y = self.train_data.batch(idx)
                batches.append((self._to_device(x), self._to_device(y)))
        with self.perf.measure():  # what speeds on uneven hardware are measured on
            loss = self.model.forward_backward(batches, self._autocast)
        with self.perf.phase(OPTIMIZER):
            norm = self.model.clip_grad_norm_(t.grad_clip)
            self.durability.before_update()  # the last snapshot's copy is done (it overlaps the step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elastic = monitor.after_backward(float(norm)) if monitor is not None else {}
        if monitor is not None:
            monitor.next_grad_accum(self.step)
        if self.sample_log is not None:
            self.sample_log.end_step(self.step)
        if self.mesh.dp_size > 1:  # report the global mean loss, as one process would see it
            if self.perf.weight != 1.0:  # uneven batches: weighted by sample count
                loss *= self.perf.weight
            dist.all_reduce(loss, group=self.mesh.dp_group)
            loss /= self.mesh.dp_size
        if not sync:
            return {"loss": loss.detach(), "lr": lr, "grad_norm": norm.detach(), **self.model.step_metrics(),
                    **elastic}
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(norm), **self.model.step_metrics(),
                **elastic}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over `eval_batches` fixed batches, split across dp ranks."""
        t = self.cfg.train
        self.model.eval()
        n = len(self.val_data)
        per_batch = t.micro_batch_size
        total = torch.zeros((), device=self.device)
        for b in range(t.eval_batches):
            start = (b * self.mesh.dp_size + self.mesh.dp_rank) * per_batch
            idx = [(start + i) % n for i in range(per_batch)]
            x, y = self.val_data.batch(idx)
            loss = self.model.eval_loss(self._to_device(x), self._to_device(y), self._autocast)
            total += loss.float()
        self.model.train()
        total /= t.eval_batches
        if self.mesh.dp_size > 1:
            dist.all_reduce(total, group=self.mesh.dp_group)
            total /= self.mesh.dp_size
        return total.item()

    def _steps_run_ahead(self) -> bool:
        """Whether fit leaves steps' values on the device between logged steps: on a GPU, unless
        the elastic batch monitor reads every step's grad norm on the host anyway."""
        return self.device.type == "cuda" and self.batch_monitor is None

    def _finish(self, settled: list[tuple[dict[str, Any], bool]], history: list[dict[str, Any]]) -> None:
        """Settled step records into MFU, the history, the metrics file (those that log) and the
        on_step callback."""
        for record, logged in settled:
            if self.flops_per_token:
                m = mfu(self.flops_per_token, record["tokens_per_s"], self.peak_flops, self.mesh.world_size)
                if m is not None:
                    record["mfu"] = m
            history.append(record)
            if logged:
                self.metrics.write(record)
            if self.mesh.is_main and self.callbacks.on_step:
                self.callbacks.on_step(record)

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train until `train.steps`; returns a summary (final losses, throughput).

        With `until` below train.steps, stop after that step without the final checkpoint, so
        a later call goes on where this one stopped (time-slicing, plait.elastic.multiplex).
        """
        t, c = self.cfg.train, self.cfg.checkpoint
        stop = t.steps if until is None else min(until, t.steps)
        per_sample = self.cfg.model.block_size if self.cfg.model.arch == "gpt" else 1  # the mlp: images
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.mesh.dp_size * per_sample
        main = self.mesh.is_main
        if main and self.callbacks.on_start:
            self.callbacks.on_start({"start_step": self.step, "steps": t.steps,
                                     "params": self.num_params,
                                     "resumed_from": str(self.resumed_from or ""),
                                     "mesh": str(self.mesh.shape), "tokens_per_step": tokens_per_step})
        self.model.train()
        last_val = None
        history: list[dict[str, Any]] = []
        if t.eval_interval and self.step == 0:  # the starting point of the held-out curve
            first = {"step": 0, "val_loss": self.evaluate()}
            self.metrics.write(first)
            if main and self.callbacks.on_eval:
                self.callbacks.on_eval(first)
        self.durability.begin()
        t0 = time.perf_counter()
        start_step = self.step
        # On a GPU, steps run ahead of the host: their loss and grad norm stay on the device until
        # a step that logs, evaluates, checkpoints or ends settles them all in one transfer (a
        # .item() per step would make the host wait for every step). On the CPU that wait costs
        # nothing, and every step settles at once with its own time.
        steps = _UnsettledSteps(tokens_per_step, ahead=self._steps_run_ahead())
        with self.perf.running():
            while self.step < stop:
                with self.perf.step(self.step + 1):  # writing a trace stays out of dt
                    ts = time.perf_counter()
                    out = self.train_step(sync=not steps.ahead)
                    dt = time.perf_counter() - ts
                record = {"step": self.step, **out, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                          **self.perf.after_step(self.step)}
                evaluated = bool(t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps))
                save_now = bool(c.interval and self.step % c.interval == 0 and self.step < t.steps)
                logged = (self.step % t.log_interval == 0 or evaluated or self.step == t.steps
                          or "rank_busy_s" in record or "dp_split" in record)
                steps.add(record, logged)
                settled = (steps.settle() if not steps.ahead or logged or save_now or self.step == stop
                           else [])
                if evaluated:  # after settling: the held-out pass's time is no step's
                    last_val = self.evaluate()
                    record["val_loss"] = last_val
                self._finish(settled, history)
                if evaluated and main and self.callbacks.on_eval:
                    self.callbacks.on_eval(record)
                if save_now:
                    self.save()
                if settled:
                    steps.restart_clock()  # evaluation, callbacks and checkpoints are no step's time
                if self.durability.after_step(self.step, self._rank_state):
                    break  # preempted: every rank checkpoints this step below, then stops
        self._finish(steps.settle(), history)
        elapsed = time.perf_counter() - t0
        if self.step < t.steps and not self.durability.preempted:  # paused (until): no final checkpoint, the writers stay open
            return {"step": self.step, "history": history, "final_val_loss": last_val, "paused": True,
                    "elapsed_s": elapsed}
        final = self.save() if self.step > start_step or self.resumed_from is None else None
        self.durability.finish(completed=not self.durability.preempted)
        self.metrics.close()
        summary = {"step": self.step, "history": history, "final_val_loss": last_val,
                   "checkpoint": str(final) if final else None, "preempted": self.durability.preempted,
                   "tokens_per_s": tokens_per_step * (self.step - start_step) / elapsed if elapsed else 0.0}
        if main and self.callbacks.on_end:
            self.callbacks.on_end(summary)
        return summary


class _UnsettledSteps:
    """Step records whose loss and grad norm may still be device tensors (see Trainer.fit)."""

    def __init__(self, tokens_per_step: int, ahead: bool):
        self.tokens_per_step = tokens_per_step
        self.ahead = ahead  # steps run ahead of the host (GPU); else every record is settled at once
        self._records: list[tuple[dict[str, Any], bool]] = []
        self._since = time.perf_counter()

    def add(self, record: dict[str, Any], logged: bool) -> None:
        self._records.append((record, logged))

    def settle(self) -> list[tuple[dict[str, Any], bool]]:
        """The records so far, as floats, emptied from here. Steps that ran ahead share their
        window's time evenly: the host saw only when each was queued, not when it finished."""
        records, self._records = self._records, []
        if self.ahead and records:
            # One transfer for the window; it waits for the last step to finish, so the clock is
            # read after it.
            values = torch.stack([torch.stack([r["loss"].float(), r["grad_norm"].float()])
                                  for r, _ in records]).tolist()
            per_step = (time.perf_counter() - self._since) / len(records)
            for (record, _), (loss, norm) in zip(records, values):
                record.update(loss=loss, grad_norm=norm, step_time_s=per_step,
                              tokens_per_s=self.tokens_per_step / per_step)
        self._since = time.perf_counter()
        return records

    def restart_clock(self) -> None:
        """What the host does between settled steps (evaluation, checkpoints) is no step's time."""
        self._since = time.perf_counter()
