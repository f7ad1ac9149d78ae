"""Measure tensor memory on any device, the CPU included, from the allocator's own events.

`track_allocations()` runs torch.profiler with `profile_memory=True`, which records every
allocation and free made by this process's threads that run PyTorch ops (size and time); the
running sum of those events is the memory allocated since tracking began, and its maximum the
peak. Unlike the process's RSS, this does not depend on what the C allocator keeps cached, so two
strategies measured this way are comparable. Allocations made inside communication backends'
own threads (Gloo's buffers) are not seen.

`live_tensor_bytes()` adds up the storages of the tensors Python can reach (parameters, optimizer
state, gradients), the baseline the tracked peak sits on.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class AllocationTrace:
    """Allocator events recorded by :func:`track_allocations` (bytes relative to the start)."""

    events: list[tuple[int, int]] = field(default_factory=list)  # (time ns, +alloc / -free bytes)

    @property
    def peak(self) -> int:
        """Most bytes allocated at once since tracking began (≥ 0)."""
        cur = top = 0
        for _, n in self.events:
            cur += n
            top = max(top, cur)
        return top

    @property
    def net(self) -> int:
        """Bytes still allocated at the end (allocated minus freed)."""
        return sum(n for _, n in self.events)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # Some kineto builds print a line to stderr on every profiler start and stop.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def track_allocations(device: torch.device | str = "cpu") -> Iterator[AllocationTrace]:
    """Record allocations on `device`'s type while inside; read `.peak` / `.net` afterwards."""
    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = AllocationTrace()
    prof = profile(activities=activities, profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        yield trace
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
        want = "CUDA" if device.type == "cuda" else "CPU"
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and want in str(e.device_type())]
        trace.events = sorted(events)


def live_tensor_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes of the distinct storages behind every tensor reachable from Python on `device`."""
    device = torch.device(device)
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != device.type:
                continue
            st = obj.untyped_storage()
            ptr = st.data_ptr()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses, invalidated storages
            continue
        if ptr:
            seen[ptr] = st.nbytes()
    return sum(seen.values())
