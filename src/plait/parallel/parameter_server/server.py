"""A parameter server: owns one shard of the flat parameters and its optimizer state.

It answers worker requests one at a time, in arrival order (see :mod:`.protocol`):

* sync: a step's gradients are kept per worker until every worker has pushed; they are summed in
  worker order (so the result does not depend on arrival order), averaged, clipped by the global
  norm across all servers, applied, and the new shard goes to every worker. This is all-reduce
  data parallelism computed in a different place.
* async: each gradient is applied on arrival and the pusher gets the current shard back.
* ssp: as async, but a worker may start step k only while k − (slowest live worker's clock) ≤ s;
  otherwise it is told to WAIT and polls until the slowest catches up.

Liveness (async, ssp): a worker silent for longer than `worker_timeout_s` is declared dead and
left out of the staleness bound and of the end-of-job condition; a failed send to it does the
same at once. The job ends when every worker has finished (DONE) or died; finished workers
linger, polling, until then, so that all of them leave with the same final parameters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.errors import CheckpointError
import plait.parallel.parameter_server.protocol as protocol
from plait.parallel.parameter_server.layout import PSLayout
from plait.parallel.parameter_server.options import PSOptions, build_shard_optimizer
from plait.parallel.parameter_server.protocol import Header, Kind
from plait.parallel.parameter_server.sharding import FlatLayout

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    """What one server did: updates applied, bytes and messages received, workers lost."""

    updates: int = 0
    bytes_received: int = 0
    messages: int = 0
    polls: int = 0
    max_staleness: int = 0
    max_ahead: int = 0
    dead_workers: list[int] = field(default_factory=list)


class ParameterServer:
    """Serves shard `layout.server_index` of `model`'s trainable parameters until the job ends.

    `model` only provides the initial values and the parameter layout (build it from the same
    seed on every rank). `on_update(server)` runs after every applied update (metrics,
    checkpoints).
    """

    def __init__(self, model: nn.Module, layout: PSLayout, opts: PSOptions,
                 on_update: Callable[["ParameterServer"], None] | None = None):
        if not layout.is_server:
            raise ValueError(f"rank {layout.rank} is a worker, not a server")
        self.layout, self.opts, self.on_update = layout, opts, on_update
        self.flat = FlatLayout.of(model)
        self.start, self.stop = self.flat.shard_bounds(layout.n_servers)[layout.server_index]
        self.shard = self.flat.read_params(model)[self.start:self.stop].to("cpu").clone()
        # One optimizer parameter per piece of a tensor in the shard; each shares storage with
        # `shard`, so the optimizer updates the buffer that is sent to workers.
        self._pieces: list[tuple[nn.Parameter, int, int]] = []
        decay = []
        for piece in self.flat.pieces(self.start, self.stop):
            a, b = piece.start - self.start, piece.stop - self.start
            self._pieces.append((nn.Parameter(self.shard[a:b]), a, b))
            decay.append(len(piece.slot.shape) >= 2)  # weight decay on matrices only
        self.optimizer = build_shard_optimizer([(p, d) for (p, _, _), d in zip(self._pieces, decay)], opts)
        self.version = 0
        self.clocks = {w: 0 for w in layout.workers}
        self.done: set[int] = set()
        self.released: set[int] = set()
        self.dead: set[int] = set()
        self.stats = ServerStats()
        n = self.stop - self.start
        if opts.mode == "sync":
            self._grads = {w: torch.zeros(n, dtype=self.shard.dtype) for w in layout.workers}
            self._pending: set[int] = set()
        self._scratch = torch.zeros(n, dtype=self.shard.dtype)
        self._last_seen: dict[int, float] = {}

    # --- the loop ----------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def global_step(self) -> int:
        """Optimizer steps in units of one synchronous step (a version per worker when async)."""
        if self.opts.mode == "sync":
            return self.version
        return self.version // self.layout.n_workers

    def serve(self) -> ServerStats:
        """Answer requests until every worker has finished or died; returns the statistics."""
        now = time.monotonic()
        self._last_seen = {w: now for w in self.layout.workers}
        buf = protocol.header_buffer()
        while len(self.released | self.dead) < self.layout.n_workers:
            src, header = protocol.recv_request(buf)
            self.stats.messages += 1
            self.stats.bytes_received += protocol.HEADER_BYTES
            self._last_seen[src] = time.monotonic()
            self._handle(src, header)
            if self.opts.mode != "sync":
                self._reap_silent()
        return self.stats

    def _handle(self, src: int, h: Header) -> None:
        if src in self.dead:  # declared dead, yet it spoke: read what it sent, tell it to stop
            if h.kind in protocol.CARRIES_PAYLOAD:
                self._recv_payload(src, self._scratch)
            self._reply(src, Header(Kind.STOP))
        elif h.kind == Kind.HELLO:
            self._go_or_wait(src)
        elif h.kind == Kind.PUSH:
            self._on_push(src, h)
        elif h.kind == Kind.POLL:
            self.stats.polls += 1
            self._go_or_wait(src)
        elif h.kind == Kind.DONE:
            self.done.add(src)
            if len(self.done | self.dead) == self.layout.n_workers:
                self.released.add(src)
                self._reply(src, Header(Kind.RELEASE, self.clocks[src], self.version), self.shard)
            else:
                self._reply(src, Header(Kind.LINGER, self.clocks[src], self.version))
        else:
            raise RuntimeError(f"rank {src} sent an unexpected {h.kind.name} request")

    # --- gradients ---------------------------------------------------------------------------

    def _on_push(self, src: int, h: Header) -> None:
        if self.opts.mode == "sync":
            if h.step != self.version:
                raise RuntimeError(f"sync: worker rank {src} pushed step {h.step} while server "
                                   f"{self.layout.rank} is at step {self.version}")
            self._recv_payload(src, self._grads[src])
            self.clocks[src] = h.step + 1
            self._pending.add(src)
            if len(self._pending) == self.layout.n_workers:
                self._sync_update()
            return
        if not self._recv_payload(src, self._scratch):
            return
        staleness = self.version - h.version  # updates by others since the worker read the shard
        self.stats.max_staleness = max(self.stats.max_staleness, staleness)
        self.clocks[src] = h.step + 1
        self._apply(self._scratch)
        self._go_or_wait(src, staleness)

    def _sync_update(self) -> None:
        workers = sorted(self._pending)
        grad = self._grads[workers[0]].clone()
        for w in workers[1:]:
            grad += self._grads[w]
        grad /= len(workers)
        if self.opts.grad_clip > 0:
            sq = grad.double().square().sum()
            if self.layout.server_group is not None:
                dist.all_reduce(sq, group=self.layout.server_group)
            # As torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
            coef = min(1.0, self.opts.grad_clip / (sq.sqrt().item() + 1e-6))
            grad.mul_(coef)
        self._apply(grad)
        works = []
        for w in workers:
            works += protocol.isend(w, Header(Kind.PARAMS, self.clocks[w], self.version), self.shard,
                                    request=False)
        for work in works:
            work.wait()
        self._pending.clear()

    def _apply(self, grad: torch.Tensor) -> None:
        for param, a, b in self._pieces:
            param.grad = grad[a:b]
        lr = self.opts.lr_at(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1
        self.stats.updates += 1
        if self.on_update is not None:
            self.on_update(self)

    # --- staleness and liveness --------------------------------------------------------------

    def ahead_of_slowest(self, worker: int) -> int:
        """How many steps `worker` is ahead of the slowest worker still training."""
        training = [self.clocks[w] for w in self.layout.workers
                    if w not in self.dead and w not in self.done]
        return self.clocks[worker] - min(training) if training else 0

    def _go_or_wait(self, src: int, staleness: int = 0) -> None:
        ahead = self.ahead_of_slowest(src)
        if self.opts.mode == "ssp" and ahead > self.opts.staleness:
            self._reply(src, Header(Kind.WAIT, self.clocks[src], self.version, staleness, ahead))
            return
        self.stats.max_ahead = max(self.stats.max_ahead, ahead)
        self._reply(src, Header(Kind.PARAMS, self.clocks[src], self.version, staleness, ahead),
                    self.shard)

    def _reap_silent(self) -> None:
        now = time.monotonic()
        for w in self.layout.workers:
            if w in self.released or w in self.dead:
                continue
            if now - self._last_seen[w] > self.opts.worker_timeout_s:
                self._declare_dead(w, f"silent for {now - self._last_seen[w]:.1f} s")

    def _declare_dead(self, worker: int, why: str) -> None:
        log.warning("server %d: worker rank %d is dead (%s); training goes on without it",
                    self.layout.rank, worker, why)
        self.dead.add(worker)
        self.stats.dead_workers.append(worker)

    # --- messages ----------------------------------------------------------------------------

    def _recv_payload(self, src: int, out: torch.Tensor) -> bool:
        """Read the payload that follows `src`'s header; False if the worker died meanwhile."""
        try:
            protocol.recv_payload(src, out, request=True)
        except RuntimeError as exc:  # the worker died between its header and its payload
            self._lost(src, exc)
            return False
        self.stats.bytes_received += out.numel() * out.element_size()
        return True

    def _reply(self, dst: int, header: Header, payload: torch.Tensor | None = None) -> None:
        try:
            protocol.send(dst, header, payload, request=False)
        except RuntimeError as exc:
            self._lost(src=dst, exc=exc)

    def _lost(self, src: int, exc: Exception) -> None:
        if self.opts.mode == "sync":
            raise RuntimeError(f"sync parameter server {self.layout.rank}: worker rank {src} "
                               f"failed ({exc}); sync mode cannot continue without it") from exc
        if src not in self.dead:
            self._declare_dead(src, f"connection lost: {str(exc).splitlines()[0][:120]}")

    # --- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The shard, its optimizer state, the version and the workers' clocks."""
        return {"shard": self.shard.clone(), "optim": self.optimizer.state_dict(),
                "version": self.version, "clocks": dict(self.clocks),
                "bounds": [self.start, self.stop], "numel": self.flat.numel,
                "n_servers": self.layout.n_servers, "mode": self.opts.mode}

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from :meth:`state_dict`; the model and server count must match."""
        if state["numel"] != self.flat.numel or state["n_servers"] != self.layout.n_servers:
            raise CheckpointError(
                f"{source} holds shard {state['bounds']} of a {state['numel']}-element model on "
                f"{state['n_servers']} servers; this job has {self.flat.numel} elements on "
                f"{self.layout.n_servers} servers (keep [model] and parallel.ps.servers)")
        self.shard.copy_(state["shard"])
        self.optimizer.load_state_dict(state["optim"])
        self.version = int(state["version"])
        saved = {int(w): int(c) for w, c in state["clocks"].items()}
        # A worker rank the checkpoint does not know resumes with the slowest known clock.
        fallback = min(saved.values()) if saved else 0
        self.clocks = {w: saved.get(w, fallback) for w in self.layout.workers}
