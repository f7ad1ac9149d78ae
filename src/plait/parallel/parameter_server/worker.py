"""A parameter-server worker: computes gradients on its data, pushes them, pulls parameters.

The worker's model parameters are views of one flat buffer, so a server's reply is received
straight into the model. Typical use with any plain model::

    worker = PSWorker(model, layout, opts)
    step = worker.start()                      # parameters from the servers; resume position
    while step < steps:
        loss_fn(model, batch).backward()
        step = worker.push_pull().step         # gradient out, fresh parameters in
    worker.finish()                            # waits for the job to end; final parameters
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from plait.errors import PlaitError
import plait.parallel.parameter_server.protocol as protocol
from plait.parallel.parameter_server.layout import PSLayout
from plait.parallel.parameter_server.options import PSOptions
from plait.parallel.parameter_server.protocol import Header, Kind
from plait.parallel.parameter_server.sharding import FlatLayout

# Polling backs off from POLL_MIN_S to POLL_MAX_S: prompt when the wait is short, cheap when long.
POLL_MIN_S = 0.0005
POLL_MAX_S = 0.02


class WorkerEvicted(PlaitError, RuntimeError):
    """The servers declared this worker dead (it was silent too long); it must stop."""


@dataclass
class StepReport:
    """One push/pull round as this worker saw it.

    staleness: updates by other workers between reading the parameters and applying this
    gradient (max over servers). ahead: steps this worker is ahead of the slowest live worker
    when allowed to go on (the quantity ssp bounds). wait_s: time from sending the gradient to
    holding fresh parameters; bound_wait_s: the part of it spent held back by the ssp bound.
    """

    step: int
    staleness: int
    ahead: int
    wait_s: float
    bound_wait_s: float


class PSWorker:
    """Trains `model` against the servers of `layout`; every rank builds the model from one seed."""

    def __init__(self, model: nn.Module, layout: PSLayout, opts: PSOptions):
        if layout.is_server:
            raise ValueError(f"rank {layout.rank} is a server, not a worker")
        self.model, self.layout, self.opts = model, layout, opts
        self.flat = FlatLayout.of(model)
        self.bounds = self.flat.shard_bounds(layout.n_servers)
        device = next(p.device for p in self.flat.trainable(model))
        self.params = torch.empty(self.flat.numel, dtype=self.flat.dtype, device=device)
        self.flat.bind_params(model, self.params)
        # Gloo sends and receives CPU tensors; an accelerator model goes through a copy.
        self._wire = self.params if device.type == "cpu" else torch.empty_like(self.params, device="cpu")
        self.grads = torch.zeros(self.flat.numel, dtype=self.flat.dtype)
        self.versions = [0] * layout.n_servers
        self.step = 0
        self._header = protocol.header_buffer()

    def start(self) -> int:
        """Fetch the parameters; returns the step to start from (0, or the resumed position)."""
        replies, _ = self._round(Kind.HELLO)
        self.step = min(h.step for h in replies)
        self._wire_to_model()
        return self.step

    def push_pull(self) -> StepReport:
        """Send the model's gradients to the servers and load the parameters they send back.

        Gradients are zeroed afterwards. In ssp mode this returns only once this worker may start
        its next step. Raises :class:`WorkerEvicted` if the servers gave up on this worker.
        """
        self.flat.gather_grads(self.model, self.grads)
        if self.opts.mode != "sync" and self.opts.grad_clip > 0:
            # Each gradient is its own update, so clip it whole, as one process would.
            norm = torch.linalg.vector_norm(self.grads).item()
            self.grads.mul_(min(1.0, self.opts.grad_clip / (norm + 1e-6)))
        t0 = time.perf_counter()
        replies, bound_wait = self._round(Kind.PUSH)
        self._wire_to_model()
        wait = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        self.step += 1
        return StepReport(step=self.step, staleness=max(h.staleness for h in replies),
                          ahead=max(h.ahead for h in replies), wait_s=wait, bound_wait_s=bound_wait)

    def finish(self) -> None:
        """Report the end of training and wait until every worker has finished or died; the
        model then holds the servers' final parameters (the same on every surviving worker)."""
        self._round(Kind.DONE)
        self._wire_to_model()

    # --- one request to every server ---------------------------------------------------------

    def _round(self, kind: Kind) -> tuple[list[Header], float]:
        """Send `kind` to every server and read the replies, polling servers that say WAIT (ssp)
        or LINGER (others still training). Returns the final replies and the time spent polling."""
        pending = {s: kind for s in self.layout.servers}
        final: dict[int, Header] = {}
        delay, first, polled_since = POLL_MIN_S, True, time.perf_counter()
        while pending:
            works = []
            for s, k in pending.items():
                lo, hi = self.bounds[s]
                payload = self.grads[lo:hi] if k == Kind.PUSH else None
                works += protocol.isend(s, Header(k, self.step, self.versions[s]), payload, request=True)
            again: dict[int, Kind] = {}
            stopped_by = []
            for _ in pending:  # read every reply, even after a STOP, so none is left unread
                s, h = protocol.recv_reply(self._header, self._slice)
                if h.kind == Kind.STOP:
                    stopped_by.append(s)
                elif h.kind == Kind.WAIT:
                    again[s] = Kind.POLL
                elif h.kind == Kind.LINGER:
                    again[s] = Kind.DONE
                else:
                    final[s] = h
                    self.versions[s] = h.version
            for w in works:
                w.wait()
            if stopped_by:
                raise WorkerEvicted(f"worker rank {self.layout.rank} was declared dead by server(s) "
                                    f"{stopped_by} (silent longer than parallel.ps.worker_timeout_s="
                                    f"{self.opts.worker_timeout_s})")
            if again and first:
                polled_since, first = time.perf_counter(), False
            pending = again
            if pending:
                time.sleep(delay)
                delay = min(2 * delay, POLL_MAX_S)
        polled = 0.0 if first else time.perf_counter() - polled_since
        return [final[s] for s in self.layout.servers], polled

    def _slice(self, server: int) -> torch.Tensor:
        lo, hi = self.bounds[server]
        return self._wire[lo:hi]

    def _wire_to_model(self) -> None:
        if self._wire is not self.params:
            self.params.copy_(self._wire)
