"""A parameter-server job whose worker rank 2 stalls at step 5 and waits to be killed.

Kept apart from the test module so that the spawned processes import only what they run.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from plait.parallel.parameter_server.run import WorkerHooks, ps_train_process

VICTIM, STALL_AT = 2, 5


def _stall(flag: str, rank: int, step: int) -> None:
    """The victim stops at STALL_AT, writes its pid to `flag`, and waits to be killed."""
    if rank == VICTIM and step == STALL_AT:
        tmp = Path(flag + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(flag)
        time.sleep(300)


def job_with_victim(cfg_dict: dict, flag: str) -> dict:
    return ps_train_process(cfg_dict, WorkerHooks(before_step=functools.partial(_stall, flag)))
