"""Start N local processes through torch's elastic launcher (the machinery behind torchrun)."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable

from plait.errors import LaunchError

log = logging.getLogger(__name__)


def launch(fn: Callable[..., Any], args: tuple, nproc: int, max_restarts: int = 0,
           run_id: str | None = None) -> dict[int, Any]:
    """Run `fn(*args)` in `nproc` processes on this machine; returns {rank: return value}.

    Uses a standalone c10d rendezvous on a free loopback port, as `torchrun --standalone` does.
    A failing process ends the job with :class:`LaunchError` naming the rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=run_id or f"plait-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",
        max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        lines = []
        for rank, failure in sorted(exc.failures.items()):
            msg = failure.message
            if isinstance(msg, dict):
                msg = msg.get("message", msg)
            lines.append(f"rank {rank} (exit code {failure.exitcode}): {msg}")
        raise LaunchError("training processes failed:\n" + "\n".join(lines)) from None
