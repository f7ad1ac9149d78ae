"""Preemption: SIGTERM or SIGUSR1 ends training cleanly with a checkpoint, within a deadline.

Schedulers warn before they take machines away: Kubernetes sends SIGTERM and waits
`terminationGracePeriodSeconds`; Slurm sends SIGTERM (or, with `--signal=USR1@120`, SIGUSR1 a
chosen time ahead) before it preempts or a job's time runs out. A handler only records the
signal; after each step every rank agrees (one tiny all-reduce) whether any rank got one, so all
finish the same step, write one checkpoint together and stop. The process then exits with
:data:`PREEMPTED_EXIT_CODE` (EX_TEMPFAIL, "try again"), which a job script or a Kubernetes
`podFailurePolicy` tells apart from a failure to requeue the job; `plait train` (resume "auto")
continues it on whatever machines and layout it gets next.

If the checkpoint is not written within `deadline_s` of the signal, the process exits anyway
(a scheduler's kill would follow): checkpoints are published atomically, so the previous one
stays the newest valid.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, retry later
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preemption:
    """Records SIGTERM/SIGUSR1 and lets the ranks agree on stopping at a step boundary."""

    def __init__(self, deadline_s: float = 25.0, signals: tuple[str, ...] = SIGNALS):
        self.deadline_s = deadline_s
        self.signals = [getattr(signal, s) for s in signals if hasattr(signal, s)]
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def install(self) -> bool:
        """Take over the signals (main thread only; elsewhere nothing is installed: False)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals are not handled: training does not run in the main thread")
            return False
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return True

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers; cancel the deadline."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            return
        self.received, self.received_at = signum, time.monotonic()
        log.warning("%s received: finishing this step, then checkpointing and exiting with code %d "
                    "(deadline %.0f s)", signal.Signals(signum).name, PREEMPTED_EXIT_CODE, self.deadline_s)
        self._timer = threading.Timer(self.deadline_s, self._deadline)
        self._timer.daemon = True
        self._timer.start()

    def _deadline(self) -> None:
        log.error("the preemption checkpoint did not finish within %.0f s of %s; exiting with code %d "
                  "(the previous checkpoint stays the newest valid)", self.deadline_s, self.signal_name,
                  PREEMPTED_EXIT_CODE)
        logging.shutdown()
        os._exit(PREEMPTED_EXIT_CODE)

    def agreed(self, device: torch.device, world_size: int) -> bool:
        """Collective (every rank, after every step): True when any rank has received a signal."""
        flag = 1.0 if self.received is not None else 0.0
        if dist.is_initialized() and world_size > 1:
            t = torch.tensor([flag], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = t.item()
        return flag > 0

    def finished(self) -> None:
        """The checkpoint is written: the deadline no longer applies."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
