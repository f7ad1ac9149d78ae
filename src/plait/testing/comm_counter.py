"""Count the collectives a piece of code issues, per mesh group: calls and bytes.

    with CommCounter(mesh) as comm:
        loss = model(x, y)
    comm.calls("tp", "all_reduce")   # -> 2 per transformer block (+1 for the embedding)
    comm.bytes("dp")                 # bytes this rank handed to dp-group collectives

While active, the counter wraps the collective functions of `torch.distributed` (`dist.all_reduce`,
`dist.all_gather_single`, ...) so that every call made through the module attribute is recorded
before it runs; the wrapped functions are restored on exit. Counters nest: an inner one wraps the
outer one's wrappers, so both see the calls. Calls made through functions imported by name before
the counter started, through torch's functional collectives (DTensor), or direct calls of
`dist.isend` / `dist.irecv` (outside `batch_isend_irecv`) are not seen.

Bytes are what this rank contributes to the collective: the tensor for all-reduce, broadcast and
point-to-point, the input for gathers and reduce-scatters.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any, Callable

import torch
import torch.distributed as dist

from plait.mesh import DIMS, ParallelMesh

# Function name in torch.distributed -> the argument whose tensor bytes count (None: no tensor).
COLLECTIVES: dict[str, str | None] = {
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "reduce": "tensor",
    "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor",
    "all_gather_single": "input_tensor",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input",
    "all_to_all_single": "input",
    "gather": "tensor",
    "scatter": "tensor",
    "send": "tensor",
    "recv": "tensor",
    "barrier": None,
    "all_gather_object": None,
    "gather_object": None,
    "broadcast_object_list": None,
    # Recorded per contained P2POp, as isend / irecv. dist.isend and dist.irecv themselves are
    # left unwrapped: P2POp accepts only those exact functions as its op.
    "batch_isend_irecv": None,
}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class PatchedCollectives:
    """Swaps every collective in :data:`COLLECTIVES` for `self._wrap(name, fn, tensor_arg)` inside
    a `with` block and puts the originals back after; subclasses say what the wrapper does."""

    _saved: dict[str, Callable]

    def _wrap(self, name: str, fn: Callable, tensor_arg: str | None) -> Callable:
        raise NotImplementedError

    def __enter__(self):
        for name, tensor_arg in COLLECTIVES.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn, tensor_arg))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


class CommCounter(PatchedCollectives):
    """Context manager recording collective calls and bytes per mesh group ("dp", "tp", "pp").

    A call on a group that is none of the mesh's is recorded under "world" (the default group)
    or "other". With a single-process mesh, or when two dimensions share one group object,
    the first dimension in ("pp", "dp", "tp") order names it.
    """

    def __init__(self, mesh: ParallelMesh | None = None):
        self._names: dict[int, str] = {}
        if mesh is not None:
            for dim in DIMS:
                group = mesh.groups.get(dim)
                if group is not None:
                    self._names.setdefault(id(group), dim)
        self.call_counts: Counter[tuple[str, str]] = Counter()
        self.byte_counts: Counter[tuple[str, str]] = Counter()
        self._saved: dict[str, Callable] = {}

    # --- reading ---------------------------------------------------------------------------

    def calls(self, group: str, op: str | None = None) -> int:
        """Number of calls on `group` ("dp", "tp", "pp", "world"), of one op or of all."""
        return sum(n for (g, o), n in self.call_counts.items() if g == group and op in (None, o))

    def bytes(self, group: str, op: str | None = None) -> int:
        """Bytes this rank contributed on `group`, for one op or all."""
        return sum(n for (g, o), n in self.byte_counts.items() if g == group and op in (None, o))

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group: {op: {"calls": n, "bytes": b}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (g, o), n in sorted(self.call_counts.items()):
            out.setdefault(g, {})[o] = {"calls": n, "bytes": self.byte_counts[(g, o)]}
        return out

    def reset(self) -> None:
        self.call_counts.clear()
        self.byte_counts.clear()

    # --- recording -------------------------------------------------------------------------

    def _group_name(self, group: Any) -> str:
        if group is None:
            return "world"
        if id(group) in self._names:
            return self._names[id(group)]
        return "world" if group is dist.group.WORLD else "other"

    def _record(self, group: Any, op: str, nbytes: int) -> None:
        key = (self._group_name(group), op)
        self.call_counts[key] += 1
        self.byte_counts[key] += nbytes

    def _wrap(self, name: str, fn: Callable, tensor_arg: str | None) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if name == "batch_isend_irecv":
                for p2p in (args[0] if args else kwargs["p2p_op_list"]):
                    self._record(p2p.group, p2p.op.__name__, _nbytes(p2p.tensor))
            else:
                bound = signature.bind_partial(*args, **kwargs).arguments
                nbytes = _nbytes(bound.get(tensor_arg)) if tensor_arg else 0
                self._record(bound.get("group"), name, nbytes)
            return fn(*args, **kwargs)

        return recorded

