"""Name a training step's phases in torch.profiler traces, without touching the strategies.

The trainer names its own phases (``plait/step N``, ``plait/data``, ``plait/optimizer``) with
:func:`phase`. :class:`PhaseNames`, installed only while tracing, names the model's:

- forward: a range around the plain model's forward (``plait/forward``), or around each pipeline
  chunk's forward (``plait/pp F<chunk> mb<k>``), from module hooks;
- backward: ``torch.autograd.backward`` (which `Tensor.backward` calls) is wrapped in a range,
  ``plait/backward``, or ``plait/pp B<chunk> mb<k>`` for a pipeline chunk: the chunk is known
  from the output tensor its forward returned, and on the last stage (whose backward starts from
  the loss) from the order of its micro-batches, which every schedule runs in order per chunk.

Collectives are named by :class:`plait.profile.comm.CommTap`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

PREFIX = "plait/"
STEP = "plait/step "
DATA, FORWARD, BACKWARD, OPTIMIZER = "plait/data", "plait/forward", "plait/backward", "plait/optimizer"
PP_FORWARD, PP_BACKWARD = "plait/pp F", "plait/pp B"


@contextlib.contextmanager
def phase(name: str, enabled: bool) -> Iterator[None]:
    """A profiler range `name` when `enabled`, else nothing (no cost beyond the call)."""
    if not enabled:
        yield
        return
    with record_function(name):
        yield


class PhaseNames:
    """Installs forward hooks and a backward wrapper that name the model's phases; `remove()`
    (or leaving the `with` block) takes them away. Call :meth:`new_step` before each step."""

    def __init__(self, model: nn.Module):
        self._handles: list[Any] = []
        self._saved_backward = None
        self._outputs: dict[int, tuple[int, int]] = {}  # id(chunk output) -> (chunk, micro-batch)
        self._forwards: dict[int, int] = {}  # chunk -> forwards this step
        self._backwards: dict[int, int] = {}  # chunk -> backwards this step
        runtime = getattr(model, "runtime", None)
        chunks = getattr(runtime, "chunks", None)
        if isinstance(chunks, dict) and chunks:  # a pipeline stage
            self._last = runtime.last_chunk if runtime.last_chunk in chunks else None
            for g, chunk in chunks.items():
                self._hook(chunk, g)
        else:
            self._last = None
            self._hook(getattr(model, "module", model), None)
        self._patch_backward()

    def new_step(self) -> None:
        self._outputs.clear()
        self._forwards.clear()
        self._backwards.clear()

    def _hook(self, module: nn.Module, chunk: int | None) -> None:
        open_ranges: list[record_function] = []

        def pre(mod: nn.Module, args: tuple) -> None:
            if chunk is None:
                name = FORWARD
            else:
                mb = self._forwards.get(chunk, 0)
                self._forwards[chunk] = mb + 1
                name = f"{PP_FORWARD}{chunk} mb{mb}"
            rf = record_function(name)
            rf.__enter__()
            open_ranges.append(rf)

        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)
            # The runtime keeps a chunk's output alive until its backward, so its id is unique
            # until then; the last chunk's output is not kept (its backward starts from the loss).
            if chunk is not None and chunk != self._last and isinstance(out, torch.Tensor):
                self._outputs[id(out)] = (chunk, self._forwards[chunk] - 1)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def _backward_name(self, tensors: Any) -> str:
        first = tensors[0] if isinstance(tensors, (list, tuple)) and tensors else tensors
        found = self._outputs.pop(id(first), None)
        if found is None and self._last is not None:  # the last stage starts from the loss
            found = (self._last, self._backwards.get(self._last, 0))
        if found is None:
            return BACKWARD
        chunk, mb = found
        self._backwards[chunk] = self._backwards.get(chunk, 0) + 1
        return f"{PP_BACKWARD}{chunk} mb{mb}"

    def _patch_backward(self) -> None:
        original = torch.autograd.backward
        self._saved_backward = original

        def named_backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            with record_function(self._backward_name(tensors)):
                return original(tensors, *args, **kwargs)

        torch.autograd.backward = named_backward

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._saved_backward is not None:
            torch.autograd.backward = self._saved_backward
            self._saved_backward = None

    def __enter__(self) -> "PhaseNames":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
