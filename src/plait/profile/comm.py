"""Time spent blocked in communication, and collectives named in traces with their group and bytes.

While a :class:`CommTap` is active it wraps the collective functions of `torch.distributed`, as
:class:`plait.testing.CommCounter` does, so every call made through the module attribute passes
through it. A synchronous call's duration and the time spent in `wait()` on an asynchronous one's
work (the work is handed back wrapped) are added to :attr:`CommTap.collective_s`, or to
:attr:`CommTap.p2p_s` for point-to-point transfers (a pipeline stage waiting for its neighbour).
The rest of a step is the rank's own work: its busy time, which live straggler statistics and
speed measurement compare across ranks.

With `annotate` set (while tracing), each call and each wait is also a profiler range:
``plait/comm all_reduce dp 1.2 MB`` and ``plait/wait all_reduce dp 1.2 MB``, or
``plait/wait irecv pp 256 KB``. The bookkeeping costs one Python wrapper per call.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from plait.mesh import DIMS, ParallelMesh
from plait.testing.comm_counter import PatchedCollectives

P2P = ("send", "recv", "isend", "irecv")
COMM_PREFIX = "plait/comm "
WAIT_PREFIX = "plait/wait "


def nbytes(value: Any) -> int:
    """Bytes of a tensor, or of the tensors in a (nested) list."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


class TappedWork:
    """An asynchronous collective's work whose `wait()` is timed (and named when tracing)."""

    __slots__ = ("_work", "_tap", "_label", "_p2p")

    def __init__(self, work: Any, tap: "CommTap", label: str, p2p: bool):
        self._work, self._tap, self._label, self._p2p = work, tap, label, p2p

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        if self._tap.annotate:
            with record_function(WAIT_PREFIX + self._label):
                out = self._work.wait(*args, **kwargs)
        else:
            out = self._work.wait(*args, **kwargs)
        self._tap.add(time.perf_counter() - t0, self._p2p)
        return out

    def __getattr__(self, name: str) -> Any:  # is_completed, get_future, ... of the real work
        return getattr(self._work, name)


class CommTap(PatchedCollectives):
    """Context manager timing (and, with `annotate`, naming) this process's communication."""

    def __init__(self, mesh: ParallelMesh | None = None, annotate: bool = False):
        self.annotate = annotate
        self.collective_s = 0.0
        self.p2p_s = 0.0
        self._names: dict[int, str] = {}
        if mesh is not None:
            for dim in DIMS:
                group = mesh.groups.get(dim)
                if group is not None:
                    self._names.setdefault(id(group), dim)
        self._saved: dict[str, Callable] = {}

    @property
    def blocked_s(self) -> float:
        """Seconds blocked in communication so far (collectives and point-to-point)."""
        return self.collective_s + self.p2p_s

    def add(self, seconds: float, p2p: bool) -> None:
        if p2p:
            self.p2p_s += seconds
        else:
            self.collective_s += seconds

    def group_name(self, group: Any) -> str:
        """The mesh dimension `group` belongs to ("dp", "pp", "tp"), else "world" or "other"."""
        if group is not None and id(group) in self._names:  # a mesh group may be the world itself
            return self._names[id(group)]
        return "world" if group is None or group is dist.group.WORLD else "other"

    def _label(self, name: str, signature: inspect.Signature, tensor_arg: str | None,
               args: tuple, kwargs: dict) -> str:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return name
        size = f" {size_text(nbytes(bound.get(tensor_arg)))}" if tensor_arg else ""
        return f"{name} {self.group_name(bound.get('group'))}{size}"

    def _wrap(self, name: str, fn: Callable, tensor_arg: str | None) -> Callable:
        signature = inspect.signature(fn)
        p2p = name in P2P

        @functools.wraps(fn)
        def tapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            if name == "batch_isend_irecv":
                ops = args[0] if args else kwargs["p2p_op_list"]
                labels = [f"{op.op.__name__} {self.group_name(op.group)} {size_text(nbytes(op.tensor))}"
                          for op in ops] if self.annotate else [op.op.__name__ for op in ops]
                if self.annotate:
                    with record_function(COMM_PREFIX + "batch_isend_irecv " + " ".join(labels)):
                        works = fn(*args, **kwargs)
                else:
                    works = fn(*args, **kwargs)
                self.add(time.perf_counter() - t0, True)
                if len(works) != len(labels):  # a coalescing backend: one work for the batch
                    labels = ["batch_isend_irecv"] * len(works)
                return [TappedWork(w, self, lab, True) for w, lab in zip(works, labels)]
            if self.annotate:
                label = self._label(name, signature, tensor_arg, args, kwargs)
                with record_function(COMM_PREFIX + label):
                    out = fn(*args, **kwargs)
            else:
                label, out = name, fn(*args, **kwargs)
            self.add(time.perf_counter() - t0, p2p)
            if out is not None and hasattr(out, "wait"):
                return TappedWork(out, self, label, p2p)
            return out

        return tapped

